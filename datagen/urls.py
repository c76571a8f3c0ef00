"""Endpoint URLs: checked once where they enter, and stripped of credentials wherever they leave.

`redact_url`/`redact_text`/`redact_value` is the one redaction rule: a password or user in the
authority (`http://user:secret@host`) and the value of any query parameter that names a secret
(`?key=`, `?api_key=`, `?token=`, `?sig=`, ...) become `***`. Error lines, logs and run manifests all
go through it.
"""
from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from datagen.errors import VisinstructError

MASK = "***"
# Query parameter names whose values are secrets (compared lower-case, without - and _).
_SECRET_PARAMS = re.compile(r"(key|token|secret|passw|pwd|auth|sig|credential|session|code)")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def _secret_param(name: str) -> bool:
    return bool(_SECRET_PARAMS.search(name.lower().replace("-", "").replace("_", "")))


def redact_url(url: str) -> str:
    """The URL with its user, password and secret query values replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_unparsed(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    query = "&".join(_redact_param(part) for part in parts.query.split("&")) if parts.query else ""
    fragment = MASK if parts.fragment and "=" in parts.fragment else parts.fragment
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_param(part: str) -> str:
    """`name=value` with a secret name masked; a bare `?token` (no name) masked whole."""
    name, sep, _ = part.partition("=")
    if not sep:
        return MASK if part else part
    return f"{name}={MASK}" if _secret_param(unquote(name)) else part


def _redact_unparsed(url: str) -> str:
    """A URL urllib cannot split: keep the scheme and host-ish start, mask anything after @ or ?."""
    url = re.sub(r"(://)[^/@\s]*@", r"\1" + MASK + "@", url)
    return re.sub(r"\?.*$", "?" + MASK, url)


def redact_text(text: str) -> str:
    """Every URL inside a free text, redacted (messages, log lines, command lines)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group()), text)


def redact_value(value: Any) -> Any:
    """A JSON-like value with every string in it redacted (a manifest entry before it is written)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    return value


def check_base_url(url: str | None, flag: str = "--base-url") -> str | None:
    """The endpoint URL if it is an http(s) URL with a host and a numeric port; else a user error, before any request."""
    if url is None:
        return None
    example = "e.g. http://gpu-box:8000/v1 or https://api.openai.com/v1"
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise VisinstructError(f"{flag} {shown!r} is not a valid URL ({exc})", f"pass an http(s) URL, {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VisinstructError(f"{flag} {shown!r} is not an http(s) URL with a host", f"pass one, {example}")
    if port == 0:
        raise VisinstructError(f"{flag} {shown!r} names port 0", f"pass the server's port, {example}")
    return url.strip()


def endpoint_parts(url: str) -> tuple[str, dict[str, str], str | None]:
    """(URL without credentials or query, its query parameters, an `Authorization: Basic` value from user:password).

    The HTTP clients get the credentials as a header and query parameters instead of inside the URL (the
    OpenAI SDK would append paths after the query, and aiohttp refuses a URL user beside an auth header).
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    basic = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        basic = "Basic " + base64.b64encode(pair.encode()).decode()
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), query, basic
