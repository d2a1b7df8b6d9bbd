"""Images sent to vision models: `data:` URLs decoded and checked here; remote URLs only from the
hosts OPENAI_IMAGE_HOSTS lists (anything else is refused: the server fetches nothing a client
names, no server-side request forgery). The backend's `image` input takes base64 PNG/JPEG."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

import httpx

from app.errors import InvalidInput

_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64,(.*)", re.IGNORECASE | re.DOTALL)
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*(\S+?)\s*\)", re.DOTALL)
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
_FETCH_TIMEOUT_S = 10.0


def _refuse(field: str, message: str) -> InvalidInput:
    return InvalidInput(message, status_code=400, detail={"field": field})


def unwrap_markdown(value: str) -> str:
    """`![alt](url)` → `url`; anything else as is."""
    found = _MARKDOWN_IMAGE.fullmatch(value.strip())
    return found.group(1) if found else value.strip()


def _checked(raw: bytes, field: str, max_bytes: int) -> str:
    if len(raw) > max_bytes:
        raise _refuse(field, f"{field}: the image is {len(raw)} bytes, over the limit of {max_bytes}")
    if not any(raw.startswith(magic) for magic in _MAGIC.values()):
        raise _refuse(field, f"{field}: the image is neither PNG nor JPEG")
    return base64.b64encode(raw).decode("ascii")


def decode_data_url(url: str, field: str, max_bytes: int) -> str:
    """The image of a `data:image/png|jpeg;base64,` URL, as the backend's base64 (checked)."""
    found = _DATA_URL.fullmatch(url.strip())
    if found is None:
        raise _refuse(field, f"{field}: expected a data:image/png or data:image/jpeg base64 URL")
    payload = "".join(found.group(2).split())
    if len(payload) * 3 // 4 > max_bytes + 3:  # before decoding: do not decode what is refused anyway
        raise _refuse(field, f"{field}: the image is over the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _refuse(field, f"{field}: the image is not valid base64 ({exc})") from exc
    return _checked(raw, field, max_bytes)


async def image_base64(url: str, field: str, *, max_bytes: int, allowed_hosts: frozenset[str]) -> str:
    """Any image URL a client may send: a data URL, or an http(s) URL on an allowed host."""
    url = unwrap_markdown(url)
    if url[:5].lower() == "data:":
        return decode_data_url(url, field, max_bytes)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse(field, f"{field}: an image must be a data: URL (base64 PNG or JPEG)")
    if parts.hostname.lower() not in allowed_hosts:
        raise _refuse(
            field,
            f"{field}: remote image URLs are not fetched (host '{parts.hostname}' is not allowed); "
            "send the image inline as a data: URL",
        )
    return await _fetch(url, field, max_bytes)


async def _fetch(url: str, field: str, max_bytes: int) -> str:
    # No redirects: a redirect could lead off the allowed hosts.
    try:
        async with (
            httpx.AsyncClient(timeout=_FETCH_TIMEOUT_S, follow_redirects=False) as http,
            http.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise _refuse(field, f"{field}: fetching the image answered HTTP {response.status_code}")
            raw = bytearray()
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > max_bytes:
                    raise _refuse(field, f"{field}: the image is over the limit of {max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise _refuse(field, f"{field}: the image could not be fetched ({type(exc).__name__})") from exc
    return _checked(bytes(raw), field, max_bytes)
