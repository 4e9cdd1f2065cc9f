"""Access control: API keys (bearer tokens) with a name and a role, and short-lived signed tokens
for browsers, whose EventSource cannot send a header.

``API_KEYS`` lists ``name:role:key`` entries (comma or newline separated); a key may be given as
``sha256:<hex digest>`` so that the configuration never holds it in clear. Only digests are kept
in memory. The role may name the user's team, ``name:role@team:key`` (``alice:user@ml:<key>``):
jobs the key submits count against that team's quota. A team name is letters, digits, ``_``,
``.`` and ``-`` (up to 100); a user named in several entries has the same team in each. A user
sees and acts on their own jobs, an admin on all. With no keys configured, access control is
off, which the gateway allows only when bound to a loopback address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.config import ConfigError, Settings
from services.gateway import views
from services.gateway.errors import ApiError, error_body

Role = Literal["admin", "user", "metrics"]
ROLES: tuple[Role, ...] = ("admin", "user", "metrics")
METRICS_PATH = "/metrics"  # all a key of the metrics role may read (a scraper's)
ANONYMOUS = "anonymous"
TOKEN_COOKIE = "st_token"  # noqa: S105 (a cookie name)
TOKEN_PARAM = "access_token"  # noqa: S105 (a query parameter name)
TEAM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # also a name a quota table takes


@dataclass(frozen=True)
class Principal(BaseUser):
    name: str
    role: Role
    team: str | None = None  # whose team quota the user's jobs count against

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# With access control off: everyone acts as this one, and is recorded as it.
NOBODY = Principal(ANONYMOUS, "admin")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str) -> dict[str, Principal]:
    """Key digest -> principal, from ``API_KEYS``. Raises ConfigError naming a bad entry."""
    found: dict[str, Principal] = {}
    for number, raw in enumerate(text.replace("\n", ",").split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        name, role, key = [*entry.split(":", 2), "", ""][:3]
        role, at, team = role.partition("@")
        if not name or role not in ROLES or not key:
            raise ConfigError(f"API_KEYS entry {number} is not name:admin|user[@team]:key")
        if at and not TEAM_NAME.match(team):
            raise ConfigError(
                f"API_KEYS entry {number} ({name}): team {team!r} is not a team name"
                " (letters, digits, _ . -, up to 100)"
            )
        if key.startswith("sha256:"):
            hashed = key.removeprefix("sha256:").lower()
            if len(hashed) != 64 or any(c not in "0123456789abcdef" for c in hashed):
                raise ConfigError(f"API_KEYS entry {number} ({name}): sha256: needs 64 hex digits")
        else:
            if len(key) < 16:
                raise ConfigError(f"API_KEYS entry {number} ({name}): a key needs 16 characters or more")
            hashed = digest(key)
        if hashed in found:
            raise ConfigError(f"API_KEYS entry {number} ({name}) repeats another entry's key")
        earlier = {p.team for p in found.values() if p.name == name}
        if earlier and earlier != {team or None}:
            raise ConfigError(
                f"API_KEYS entry {number} ({name}): team {team or 'none'}, but an earlier entry of {name} has team"
                f" {earlier.pop() or 'none'}"
            )
        found[hashed] = Principal(name, role, team or None)
    return found


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_startup(settings: Settings) -> None:
    """Refuse to serve without keys anywhere but on loopback."""
    keys = parse_keys(settings.api_keys.get_secret_value())
    if not keys and not _loopback(settings.app_host):
        raise ConfigError(
            f"APP_HOST={settings.app_host} is reachable from other machines, and no API_KEYS are set: "
            "set API_KEYS (name:role[@team]:key, …) or bind to 127.0.0.1"
        )


class Auth(AuthenticationBackend):
    """Who is asking: a bearer key, else a signed token (cookie or ``access_token``)."""

    def __init__(self, settings: Settings) -> None:
        self.keys = parse_keys(settings.api_keys.get_secret_value())
        self.ttl_s = settings.auth_token_ttl_s
        configured = settings.auth_secret.get_secret_value() if settings.auth_secret else ""
        secret = configured or secrets.token_hex(32)  # unset or empty: one of our own
        self.signer = URLSafeTimedSerializer(secret, salt="stream")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @property
    def users(self) -> set[str]:
        """The names keys act as (with access control off, the one user ``anonymous``)."""
        return {p.name for p in self.keys.values() if p.role != "metrics"} if self.enabled else {ANONYMOUS}

    @property
    def teams(self) -> set[str]:
        return {p.team for p in self.keys.values() if p.team is not None}

    def issue(self, principal: Principal) -> str:
        return self.signer.dumps([principal.name, principal.role, principal.team])

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        if not self.enabled:
            return AuthCredentials(["authenticated"]), NOBODY
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, key = header.partition(" ")
            principal = self.keys.get(digest(key.strip())) if scheme.lower() == "bearer" else None
            if principal is None:
                raise AuthenticationError("the API key is not valid")
            return AuthCredentials(["authenticated"]), principal
        token = conn.query_params.get(TOKEN_PARAM) or conn.cookies.get(TOKEN_COOKIE)
        if token is not None:
            try:
                name, role, *team = self.signer.loads(token, max_age=self.ttl_s)  # type: ignore[arg-type]  # (compared as seconds: a float works) (no team: issued before teams)
            except (BadSignature, ValueError, TypeError):
                raise AuthenticationError("the token is not valid or has expired") from None
            return AuthCredentials(["authenticated"]), Principal(name, role, team[0] if team else None)
        return None


def unauthorized(conn: HTTPConnection, exc: Exception) -> JSONResponse:
    return JSONResponse(
        error_body("unauthorized", str(exc) or "an API key is required"),
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


class RequireAuth:
    """Every path but the open ones (exact paths, and paths under open prefixes) needs an
    authenticated caller (ASGI middleware, after AuthenticationMiddleware has set
    ``scope["user"]``)."""

    def __init__(self, app: ASGIApp, open_paths: set[str], open_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.open_paths = frozenset(open_paths)
        # A prefix is a folder ("/docs/assets/"): never "/", which would open everything.
        if any(not p.endswith("/") or p == "/" for p in open_prefixes):
            raise ValueError(f"open prefixes must be folders other than '/': {open_prefixes}")
        self.open_prefixes = open_prefixes

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._open(scope["path"]) and not scope["user"].is_authenticated:
            response = unauthorized(HTTPConnection(scope), AuthenticationError("an API key is required"))
            await response(scope, receive, send)
            return
        user = scope.get("user")
        if isinstance(user, Principal) and user.role == "metrics" and scope["path"] != METRICS_PATH:
            forbidden = JSONResponse(
                error_body("forbidden", f"a metrics key reads {METRICS_PATH} only"), status_code=403
            )
            await forbidden(scope, receive, send)
            return
        await self.app(scope, receive, send)


def principal(request: Request) -> Principal:
    user = request.user
    assert isinstance(user, Principal)
    return user


def require_admin(request: Request) -> Principal:
    who = principal(request)
    if not who.is_admin:
        raise ApiError(403, "forbidden", "this needs the admin role")
    return who


def may_see(request: Request, owner: str | None) -> bool:
    who = principal(request)
    return who.is_admin or owner == who.name


def person_role(who: Principal) -> views.Role:
    """The role of a person's key. (A metrics key never gets this far: RequireAuth keeps it to
    /metrics.)"""
    if who.role == "metrics":
        raise ApiError(403, "forbidden", f"a metrics key reads {METRICS_PATH} only")
    return who.role


async def issue_token(request: Request) -> JSONResponse:
    """A short-lived signed token for the caller, as JSON and as an HttpOnly cookie: browsers
    use it for streams instead of putting a long-lived key in a URL."""
    who = principal(request)
    auth: Auth = request.app.state.auth
    token = auth.issue(who)
    body = views.Token(token=token, expires_in=auth.ttl_s, name=who.name, role=person_role(who))
    response = JSONResponse(body.model_dump(mode="json"))
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        max_age=int(auth.ttl_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def whoami(request: Request) -> JSONResponse:
    who = principal(request)
    auth: Auth = request.app.state.auth
    body = views.Me(name=who.name, role=person_role(who), team=who.team, access_control=auth.enabled)
    return JSONResponse(body.model_dump(mode="json"))


async def forget_token(request: Request) -> JSONResponse:
    """Sign a browser out: its cookie is removed. (The token itself stays valid until it expires
    minutes later; it was never shown to the page's scripts.)"""
    response = JSONResponse(views.SignedOut(signed_out=True).model_dump(mode="json"))
    response.delete_cookie(TOKEN_COOKIE, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response
