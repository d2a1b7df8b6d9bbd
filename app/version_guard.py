"""Patches of a library are applied only to the versions they were written for."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable

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


def library_patch(
    package: str, versions: tuple[str, ...], what: str
) -> Callable[[Callable[[], bool]], Callable[[], bool]]:
    """For a function that patches `package` and says whether it did: it runs once (later calls
    answer the first one's result), and only on `versions` (otherwise `written_for`'s warning, False)."""

    def decorate(apply: Callable[[], bool]) -> Callable[[], bool]:
        @functools.wraps(apply)
        @functools.cache
        def guarded() -> bool:
            return written_for(package, versions, what) and apply()

        return guarded

    return decorate
