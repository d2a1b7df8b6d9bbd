"""ASGI entry point: `uvicorn app.asgi:app`."""

import sys

from app.config import SettingsError, get_settings
from app.http_linger import linger_after_bad_requests
from app.logging_setup import configure_logging
from app.main import create_app

try:
    get_settings()
except SettingsError as exc:  # one line for the operator, not a traceback through uvicorn's import
    sys.exit(f"error: {exc}")
configure_logging()
linger_after_bad_requests()  # uvicorn's own protocol serves this app: its 400s get their answer out
app = create_app()
