"""ASGI entry point: `uvicorn app.asgi:app`."""

from app.config import settings_or_exit
from app.http_linger import linger_after_bad_requests
from app.logging_setup import configure_logging
from app.main import create_app

settings_or_exit()
configure_logging()
linger_after_bad_requests()  # uvicorn's own protocol serves this app: its 400s get their answer out
app = create_app()
