"""ASGI entry point: `uvicorn app.asgi:app`."""

from app.logging_setup import configure_logging
from app.main import create_app

configure_logging()
app = create_app()
