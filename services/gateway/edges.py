"""Which requests the gateway takes at all: those addressed to one of its names (``Host``), and,
for a request that changes something, those sent from its own pages (``Origin``).

Without access control any process on the machine may use the gateway, but a web page must not:
a page elsewhere can make the browser send a form (``text/plain`` or ``application/x-www-form-
urlencoded``, no preflight) to the gateway, or rebind its own name to 127.0.0.1 to read and write
it as a same-origin page. The ``Host`` check stops the second (the browser sends the page's name);
the ``Origin`` check, and JSON endpoints refusing any other media type (415, in :mod:`app`), the
first. With API keys, a page cannot send the key, and the cookie is ``SameSite=Strict``; the
checks still apply, ``Host`` only against an allow-list when one is set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.errors import error_body

# Methods that change something: refused from another origin. (Reads a page elsewhere sends
# cannot be read back by it: the gateway sends no CORS headers.)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_names(text: str) -> frozenset[str]:
    """A comma-separated setting as a set of lowercase entries."""
    return frozenset(part.strip().lower().rstrip("/") for part in text.split(",") if part.strip())


def host_name(authority: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    name = authority.rpartition(":")[0] if authority.count(":") == 1 else authority
    return name.rstrip(".")  # "localhost." is "localhost"


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Hosts:
    """The names the gateway answers to: ``names`` exactly, and every name under a ``*.domain``
    entry; ``"*"`` is any name. ``loopback`` adds every loopback address."""

    names: frozenset[str]
    loopback: bool = False

    def allows(self, name: str) -> bool:
        if "*" in self.names or name in self.names or (self.loopback and _is_loopback(name)):
            return True
        return any(entry.startswith("*.") and name.endswith(entry[1:]) for entry in self.names)


def allowed_hosts(access_control: bool, app_host: str, listed: str) -> Hosts | None:
    """Without access control: loopback names, APP_HOST and ALLOWED_HOSTS. With it: ALLOWED_HOSTS
    if set, else any name (None)."""
    names = split_names(listed)
    if access_control:
        return Hosts(names) if names else None
    return Hosts(names | LOOPBACK_NAMES | {host_name(app_host)}, loopback=True)


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin such as ``http://localhost:8000``; None if it is not
    one (``null``, from a sandboxed frame or a file)."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port


def _own_origin(scope: Scope, host: str) -> tuple[str, str, int] | None:
    return _origin_of(f"{scope.get('scheme', 'http')}://{host}") if host else None


class Edges:
    """ASGI middleware, outermost: a ``Host`` the gateway does not answer to is a 421, a write
    from another origin a 403, both in the API's error shape. Paths in ``any_host`` answer to
    any ``Host`` (the health check, which probes may address by IP)."""

    def __init__(
        self, app: ASGIApp, hosts: Hosts | None, origins: Iterable[str] = (), any_host: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(filter(None, map(_origin_of, origins)))
        self.any_host = frozenset(any_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host_name(host)
        if self.hosts is not None and scope["path"] not in self.any_host and not self.hosts.allows(name):
            names = "localhost, a loopback address, APP_HOST, or a name in ALLOWED_HOSTS"
            return _refuse(
                421,
                "misdirected_request",
                f"this gateway does not answer to the name {name[:100]!r}: "
                f"address it by {names if self.hosts.loopback else 'a name in ALLOWED_HOSTS'}",
                "Host",
            )
        if scope["method"] not in UNSAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:
            # No Origin: not a browser (curl, scripts), or an old one that tells where it came
            # from by Sec-Fetch-Site alone.
            if headers.get("sec-fetch-site", "") in ("cross-site", "same-site"):
                return _refuse(403, "cross_origin", "a request from another site may not change anything", "Origin")
            return None
        found = _origin_of(origin)
        if found is not None and (found == _own_origin(scope, host) or found in self.origins):
            return None
        return _refuse(
            403,
            "cross_origin",
            f"a page of {origin[:100]!r} may not change anything here: only the gateway's own pages, "
            "and origins listed in ALLOWED_ORIGINS, may",
            "Origin",
        )


def _refuse(status: int, code: str, message: str, header: str) -> JSONResponse:
    return JSONResponse(error_body(code, message, [{"field": header, "message": message}]), status_code=status)
