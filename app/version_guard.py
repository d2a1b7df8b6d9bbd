"""Patches of a library are applied only to the versions they were written for."""

from __future__ import annotations

import importlib.metadata
import logging

log = logging.getLogger(__name__)


def written_for(package: str, versions: tuple[str, ...], what: str) -> bool:
    """Whether the installed `package` starts with one of `versions`; if not, a warning that the patch
    `what` is not applied (the library then keeps its own behaviour)."""
    version = importlib.metadata.version(package)
    if version.startswith(versions):
        return True
    supported = "/".join(v + "x" for v in versions)
    log.warning("%s %s: %s is for %s %s only; not applied", package, version, what, package, supported)
    return False
