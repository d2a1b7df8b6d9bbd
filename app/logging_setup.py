from __future__ import annotations

import logging

from app.config import get_settings


def configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().LOG_LEVEL.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
