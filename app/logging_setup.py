from __future__ import annotations

import logging

from app.config import get_settings


def configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().LOG_LEVEL.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: the model catalog's read of Triton every few seconds would be
    # most of the log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
