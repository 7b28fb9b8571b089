"""The dashboard's access control: one secret token, checked on every request.

* The token lives in a file readable by its owner only (mode 0600). On first start it is created
  (``secrets.token_urlsafe(32)``) and the login link is printed; ``--token-file`` chooses the file
  (e.g. a token the consortium operator distributes).
* A request is let in when it carries the token as ``Authorization: Bearer TOKEN`` (scripts, the
  JSON API), or the session cookie that the one-time login link ``/?token=TOKEN`` sets (browsers:
  the link answers with the cookie and a redirect to the same page without the token, so the token
  does not stay in the address bar or the history). The cookie holds an HMAC of the token, not the
  token itself; it is ``HttpOnly``, ``SameSite=Lax`` and ``Secure`` under TLS.
* Anything else gets 401, for every path (pages, API, static files, unknown paths alike), so an
  unauthenticated client learns nothing about which runs exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import quote, urlencode

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

__all__ = ["COOKIE", "TokenAuth", "TokenError", "default_token_path", "load_or_create_token", "session_value"]

COOKIE = "rectalfl_dashboard"
MIN_TOKEN_CHARS = 16
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class TokenError(RuntimeError):
    """The token file cannot be used (unsafe permissions, too short, unreadable); the message says what to do."""


def default_token_path() -> Path:
    """``$XDG_CONFIG_HOME/rectalfl/dashboard.token`` (``~/.config/rectalfl/dashboard.token``).

    Deliberately outside the runs folder, so no dashboard route can ever reach it.
    """
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rectalfl" / "dashboard.token"


def load_or_create_token(path: Path | None = None) -> tuple[str, Path, bool]:
    """Read the dashboard token from ``path``, creating it (mode 0600) if it does not exist.

    Parameters
    ----------
    path : Path, optional
        The token file (default :func:`default_token_path`).

    Returns
    -------
    token : str
    path : Path
    created : bool
        True when the file was created by this call.

    Raises
    ------
    TokenError
        The file is readable or writable by group/others (``chmod 600 FILE``), empty or shorter than
        16 characters, or not readable.
    """
    path = Path(path) if path is not None else default_token_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created concurrently: read that one
            return load_or_create_token(path)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        logger.info("created dashboard token file %s (mode 0600)", path)
        return token, path, True
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TokenError(f"cannot read the dashboard token file {path}: {exc}") from exc
    if not stat.S_ISREG(mode):
        raise TokenError(f"dashboard token file {path} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"dashboard token file {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
                         f"restrict it with `chmod 600 {path}` and start again")
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the dashboard token file {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"dashboard token in {path} is {'empty' if not token else 'too short'}: use at least "
                         f"{MIN_TOKEN_CHARS} random characters, or delete the file to have a new one created")
    return token, path, False


def session_value(token: str) -> str:
    """The session cookie's value: an HMAC of the token (the cookie never holds the token itself)."""
    return hmac.new(token.encode(), b"rectalfl-dashboard-session", hashlib.sha256).hexdigest()


class TokenAuth:
    """ASGI middleware: 401 unless the request carries the token (bearer header or session cookie).

    Parameters
    ----------
    app : ASGI app
    token : str
        The secret.
    secure_cookie : bool, default False
        Mark the session cookie ``Secure`` (serve over TLS).
    """

    def __init__(self, app: ASGIApp, token: str, *, secure_cookie: bool = False) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"token must have at least {MIN_TOKEN_CHARS} characters")
        self.app = app
        self._token = token.encode()
        self._session = session_value(token).encode()
        self.secure_cookie = secure_cookie

    def _ok_token(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self._token)

    def authorised(self, headers: Headers) -> bool:
        """True when the headers carry the bearer token or the session cookie."""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._ok_token(auth[7:].strip()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self._session):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = QueryParams(scope.get("query_string", b""))
        if "token" in query:
            if not self._ok_token(query.get("token")):
                await self._deny(scope, send, "the token in the link is not valid")
                return
            rest = urlencode([(k, v) for k, v in query.multi_items() if k != "token"])
            # one leading slash only: "//host" would be a redirect to another site
            path = "/" + quote(scope["path"]).lstrip("/")
            location = path + (f"?{rest}" if rest else "")
            cookie = f"{COOKIE}={self._session.decode()}; Path=/; HttpOnly; SameSite=Lax"
            if self.secure_cookie:
                cookie += "; Secure"
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                                    (b"content-length", b"0"), *SECURITY_HEADERS]})
            await send({"type": "http.response.body", "body": b""})
            return
        if not self.authorised(headers):
            await self._deny(scope, send, "this dashboard needs its access token")
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in have]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _deny(self, scope: Scope, send: Send, why: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        api = scope["path"].startswith("/api/")
        accept = Headers(scope=scope).get("accept", "")
        if api or "text/html" not in accept:
            body = (f'{{"detail": "401 Unauthorized: {why}; send the header \'Authorization: Bearer TOKEN\' '
                    f'(the token is in the file printed by `rectalfl dashboard`)"}}').encode()
            ctype = b"application/json"
        else:
            body = (
                "<!doctype html><html lang=en><meta charset=utf-8><link rel=icon href='data:,'>"
                "<title>401 - rectalfl dashboard</title>"
                "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
                f"<h1>401 Unauthorized</h1><p>{why.capitalize()}.</p><p>Open the login link that "
                "<code>rectalfl dashboard</code> printed when it started (it ends in <code>?token=...</code>), "
                "or ask the operator for it. The token is kept in the file named there (by default "
                "<code>~/.config/rectalfl/dashboard.token</code>).</p></body></html>"
            ).encode()
            ctype = b"text/html; charset=utf-8"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="rectalfl dashboard"'), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})
