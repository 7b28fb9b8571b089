"""The operator dashboard as a FastAPI app: server-rendered pages, a JSON API and a live stream.

Routes (every one behind :class:`server.dashboard.security.TokenAuth`):

==============================================  ===============================================
``GET /``                                       runs list (``?q=`` text filter, ``?status=``)
``GET /runs/{run_id}``                          one run
``GET /compare?run=A&run=B``                    runs side by side
``GET /runs/{run_id}/files/{path}``             a file (or folder listing) inside the run directory
``GET /api/runs``                               runs list as JSON
``GET /api/runs/{run_id}``                      one run as JSON (``?series=0`` without the curves)
``GET /api/runs/{run_id}/stream``               server-sent events while the run goes
``GET /api/compare?run=A&run=B``                comparison as JSON
``GET /static/{name}``                          the dashboard's own CSS/JS (a fixed list)
==============================================  ===============================================

Nothing here writes: run records are opened read-only per request, files are served only from
inside a run directory under the runs folder (:func:`server.dashboard.data.safe_file`).
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from server.dashboard import data
from server.dashboard.security import TokenAuth

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".txt": "text/plain; charset=utf-8"}
PAGE_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
FILE_CSP = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
KEEPALIVE_S = 15.0


# --------------------------------------------------------------------------- formatting (Jinja filters)
def fmt_bytes(n: Any) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> '-'``."""
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover


def fmt_seconds(s: Any) -> str:
    """``3725 -> '1 h 02 min'``; ``None -> '-'``."""
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def fmt_ts(ts: Any) -> str:
    """ISO-8601 UTC -> ``'2025-01-31 12:00:05 UTC'``."""
    if not ts:
        return "-"
    try:
        d = datetime.fromisoformat(str(ts))
    except ValueError:
        return str(ts)
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}f}" if math.isfinite(f) else "-"


# --------------------------------------------------------------------------- the app
def create_app(runs_root: Path | str, token: str, *, poll_interval: float = 1.0, secure_cookie: bool = False,
               stream_limit_s: float | None = None) -> TokenAuth:
    """Build the dashboard (an ASGI app: the FastAPI app wrapped in the token check).

    Parameters
    ----------
    runs_root : Path or str
        The runs folder (each sub-folder with a ``run.db`` is a run). Must exist.
    token : str
        The access token (at least 16 characters).
    poll_interval : float, default 1.0
        How often (seconds) the live stream looks at a running run's record.
    secure_cookie : bool, default False
        Mark the session cookie ``Secure`` (set when serving over TLS).
    stream_limit_s : float, optional
        Close a live stream after this long (the browser reconnects by itself); default: never.

    Returns
    -------
    TokenAuth
        The ASGI app to serve (``.app`` is the FastAPI app).

    Raises
    ------
    FileNotFoundError
        ``runs_root`` is not a folder.
    ValueError
        A bad ``poll_interval`` or a short token.
    """
    root = Path(runs_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {runs_root} does not exist (give --runs the folder your runs write to)")
    if not poll_interval > 0:
        raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
    api = FastAPI(title="rectalfl dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(bytes=fmt_bytes, seconds=fmt_seconds, ts=fmt_ts, num=fmt_num)
    static = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in STATIC_TYPES}

    def page(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
        resp = templates.TemplateResponse(request, name, {"root": str(root), **ctx}, status_code=status)
        resp.headers["content-security-policy"] = PAGE_CSP
        return resp

    def ref_or_404(run_id: str) -> data.RunRef:
        try:
            return data.find_run(root, run_id)
        except data.UnknownRun:
            raise HTTPException(404, f"no run {run_id!r} under {root}") from None

    def summaries(q: str | None, status: str | None) -> dict[str, Any]:
        refs, problems = data.discover_runs(root)
        rows = []
        for ref in refs:
            try:
                rows.append(data.run_summary(ref, root))
            except Exception as exc:  # noqa: BLE001 - one unreadable record must not hide the others
                problems.append({"path": str(ref.run_dir), "error": f"{type(exc).__name__}: {exc}"})
        rows.sort(key=lambda r: r.get("created_at") or "", reverse=True)
        needle = (q or "").strip().lower()
        if needle:
            rows = [r for r in rows if needle in " ".join(
                str(r.get(k) or "") for k in ("run_id", "name", "engine", "mode", "strategy", "status")).lower()]
        if status:
            rows = [r for r in rows if r["status"] == status]
        return {"runs": rows, "problems": problems, "q": q or "", "status": status or ""}

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", {"code": exc.status_code, "detail": exc.detail}, exc.status_code)

    # ------------------------------------------------------------------ pages
    @api.get("/", response_class=HTMLResponse)
    def runs_page(request: Request, q: str | None = None, status: str | None = None) -> HTMLResponse:
        return page(request, "runs.html", summaries(q, status))

    @api.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        ref = ref_or_404(run_id)
        return page(request, "run.html", {"d": data.run_detail(ref, root, series=False), "run_id": ref.run_id})

    @api.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request, run: list[str] = Query(default=[])) -> HTMLResponse:  # noqa: B008
        refs = [ref_or_404(r) for r in dict.fromkeys(run)]
        cmp = data.compare_runs(refs, root) if len(refs) >= 2 else None
        return page(request, "compare.html", {"cmp": cmp, "selected": [r.run_id for r in refs],
                                              "all_runs": summaries(None, None)["runs"]})

    @api.get("/runs/{run_id}/files/{rel:path}")
    def run_file(request: Request, run_id: str, rel: str) -> Response:
        ref = ref_or_404(run_id)
        try:
            target = data.safe_file(ref.run_dir, rel, root)
        except PermissionError:
            logger.warning("refused file request %r for run %s", rel, run_id)
            raise HTTPException(403, "that path is outside the run directory") from None
        except FileNotFoundError:
            raise HTTPException(404, f"no file {rel!r} in run {run_id}") from None
        if target.is_dir():
            entries = sorted((p for p in target.iterdir() if not p.name.startswith(".")),
                             key=lambda p: (not p.is_dir(), p.name))
            base = target.relative_to(ref.run_dir.resolve()).as_posix()
            items = [{"name": p.name + ("/" if p.is_dir() else ""),
                      "href": "/".join(x for x in (base if base != "." else "", p.name) if x),
                      "bytes": None if p.is_dir() else p.stat().st_size} for p in entries]
            return page(request, "files.html", {"run_id": ref.run_id, "path": base if base != "." else "",
                                                "items": items})
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix in (".csv", ".yaml", ".yml", ".json", ".txt", ".log"):
            ctype = "text/plain; charset=utf-8"
        resp = FileResponse(target, media_type=ctype)
        resp.headers["content-security-policy"] = FILE_CSP
        if not (ctype.startswith("text/") or ctype.startswith("image/")):
            resp.headers["content-disposition"] = f'attachment; filename="{target.name}"'
        return resp

    @api.get("/runs/{run_id}/files")
    def run_files_root(request: Request, run_id: str) -> Response:
        return run_file(request, run_id, "")

    @api.get("/static/{name}")
    def static_file(name: str) -> Response:
        path = static.get(name)
        if path is None:
            raise HTTPException(404, "no such static file")
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix])

    # ------------------------------------------------------------------ API
    @api.get("/api/runs")
    def api_runs(q: str | None = None, status: str | None = None) -> JSONResponse:
        return JSONResponse(summaries(q, status))

    @api.get("/api/runs/{run_id}")
    def api_run(run_id: str, series: bool = True) -> JSONResponse:
        return JSONResponse(data.run_detail(ref_or_404(run_id), root, series=series))

    @api.get("/api/compare")
    def api_compare(run: list[str] = Query(default=[])) -> JSONResponse:  # noqa: B008
        refs = [ref_or_404(r) for r in dict.fromkeys(run)]
        if len(refs) < 2:
            raise HTTPException(400, "name at least two runs: /api/compare?run=A&run=B")
        return JSONResponse(data.compare_runs(refs, root))

    @api.get("/api/runs/{run_id}/stream")
    async def api_stream(request: Request, run_id: str) -> StreamingResponse:
        ref = await anyio.to_thread.run_sync(ref_or_404, run_id)

        async def events() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            last: str | None = None
            quiet = 0.0
            waited = 0.0
            while True:
                try:
                    snap = await anyio.to_thread.run_sync(data.live_snapshot, ref)
                except Exception as exc:  # noqa: BLE001 - the record may be mid-write or moved; say so once
                    yield f"event: problem\ndata: {json.dumps({'error': f'{type(exc).__name__}: {exc}'})}\n\n"
                    return
                if snap["fingerprint"] != last:
                    last = snap["fingerprint"]
                    quiet = 0.0
                    yield f"event: update\ndata: {json.dumps(snap)}\n\n"
                if snap["status"] != "running":
                    yield f"event: done\ndata: {json.dumps({'status': snap['status']})}\n\n"
                    return
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                if stream_limit_s is not None and waited >= stream_limit_s:
                    return
                await anyio.sleep(poll_interval)
                quiet += poll_interval
                waited += poll_interval
                if await request.is_disconnected():
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    return TokenAuth(api, token, secure_cookie=secure_cookie)
