"""ASGI entry point: `uvicorn app.asgi:app`."""

from app.config import settings_or_exit
from app.http_protocol import harden_http_protocol
from app.logging_setup import configure_logging
from app.main import create_app

settings_or_exit()
configure_logging()
harden_http_protocol()  # uvicorn's own protocol serves this app: bounded heads, timeouts, answers out
app = create_app()
