"""The Fleet gateway: the only part of the operator's server the hospitals can reach.

Flower 1.41 serves its Control API (run submission, listing, node registration), its runtime API
(ServerApp tasks) and its Fleet API (SuperNodes) on one HTTPS port, and has no account
authentication without Flower Enterprise. So ``rectalfl server start`` binds ``flower-superlink`` to
a loopback address (``deploy.control_address``) and puts this gateway on the consortium interface
(``deploy.superlink``): it terminates TLS with the consortium's server certificate and forwards only
the Fleet API calls a SuperNode makes (``POST /v1/fleet/<call>``, the list below) to the SuperLink;
every other method or path (``/v1/control/...``, ``/v1/runtime/...``, ``/docs``, ``/openapi.json``,
the Fleet API's own node (un)registration) is answered ``403`` here and never reaches Flower. Each
refusal is logged with the caller's address.

SuperNode authentication is untouched: Flower checks the signed headers of every forwarded call
against the registered keys (the gateway forwards them as they came).

Run as ``python -m server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT --certs DIR
--log FILE`` (``server.deploy.start_superlink`` does it).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import ssl
from pathlib import Path
from typing import Any

logger = logging.getLogger("rectalfl.gateway")

FLEET_CALLS = frozenset({
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages", "get-run",
    "get-fab", "push-object", "pull-object", "confirm-message-received",
})
"""The Fleet API calls a SuperNode makes once its key is registered (``flwr.supernode.fleet_http_client``);
``register-node`` / ``unregister-node`` are left out: registration is the operator's (Control API)."""

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
                        "content-encoding"})
REFUSAL = b"refused: this address serves the Fleet API to registered SuperNodes only\n"


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: ``POST /v1/fleet/<one of FLEET_CALLS>`` exactly."""
    if method != "POST" or not path.startswith("/v1/fleet/"):
        return False
    return path[len("/v1/fleet/"):] in FLEET_CALLS


def create_app(upstream: str, ca_file: Path) -> Any:
    """The gateway's ASGI app, forwarding allowed calls to ``https://<upstream>`` (verified with ``ca_file``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    ctx = ssl.create_default_context(cafile=str(ca_file))
    client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=ctx, http2=False,
                               timeout=httpx.Timeout(600.0, connect=10.0), follow_redirects=False)

    async def app_entry(request: Request) -> Response:
        path = request.url.path
        peer = request.client.host if request.client else "?"
        if not allowed(request.method, path):
            logger.warning("refused %s %s from %s", request.method, path[:200], peer)
            return Response(REFUSAL, status_code=403, media_type="text/plain")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        headers += [(b"accept-encoding", b"identity"), (b"x-forwarded-for", peer.encode())]
        body = await request.body()
        try:
            up = await client.request("POST", path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable for %s from %s: %s", path, peer, exc)
            return Response(b"SuperLink unavailable\n", status_code=502, media_type="text/plain")
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(up.content, status_code=up.status_code, headers=out)

    async def lifespan(_app: Any):  # noqa: ANN202 - Starlette's lifespan protocol
        yield
        await client.aclose()

    from contextlib import asynccontextmanager

    from starlette.routing import Route

    # one catch-all route: every method and path reaches app_entry, which refuses what is not allowed
    return Starlette(routes=[Route("/{path:path}", app_entry, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                                                       "OPTIONS", "HEAD"])],
                     lifespan=asynccontextmanager(lifespan))


def serve(listen: str, upstream: str, certs_dir: Path, log_file: Path | None = None, *,
          rotation_hours: int = 24, backups: int = 7) -> None:
    """Serve the gateway on ``listen`` with ``certs_dir``'s server certificate (blocks)."""
    import uvicorn

    from shared.flower import split_address

    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.TimedRotatingFileHandler(
            log_file, when="H", interval=rotation_hours, backupCount=backups, utc=True, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s | %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    host, port = split_address(listen)
    certs_dir = Path(certs_dir)
    logger.info("Fleet gateway on %s -> SuperLink %s (Fleet API only)", listen, upstream)
    uvicorn.run(create_app(upstream, certs_dir / "ca.crt"), host=host, port=port, log_config=None,
                access_log=False, ssl_certfile=str(certs_dir / "server.crt"), ssl_keyfile=str(certs_dir / "server.key"),
                proxy_headers=False, server_header=False, date_header=True, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the SuperNodes connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certs", required=True, type=Path, help="certificate folder (ca.crt, server.crt, server.key)")
    p.add_argument("--log", type=Path, default=None, help="log file (rotated daily, 7 kept)")
    a = p.parse_args(argv)
    serve(a.listen, a.upstream, a.certs, a.log)


if __name__ == "__main__":
    main()
