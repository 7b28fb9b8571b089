"""Dashboard token file, the `dashboard` command, and serving over TLS with the consortium's certificates."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from server.dashboard import create_app
from server.dashboard.cli import dashboard
from server.dashboard.security import TokenError, default_token_path, load_or_create_token
from server.dashboard.serve import is_loopback, running
from server.dashboard.synthetic import write_synthetic_run
from shared.certs import init_ca

REPO = Path(__file__).resolve().parents[2]


def _cli() -> typer.Typer:
    """A tiny typer app registering the command, as the top-level CLI does."""
    app = typer.Typer()
    app.command("dashboard")(dashboard)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "dashboard" as a sub-command name
        pass

    return app


def test_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "dashboard.token"
    token, where, created = load_or_create_token(path)
    assert created and where == path and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, _, created_again = load_or_create_token(path)
    assert again == token and not created_again


def test_unsafe_or_short_token_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("x" * 40)
    path.chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_or_create_token(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(TokenError, match="too short"):
        load_or_create_token(path)
    path.write_text("")
    with pytest.raises(TokenError, match="empty"):
        load_or_create_token(path)


def test_default_token_file_is_outside_any_runs_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_token_path() == tmp_path / "xdg" / "rectalfl" / "dashboard.token"


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("dashboard.example")


@pytest.mark.parametrize(("args", "message"), [
    (["--runs", "{missing}"], "does not exist"),
    (["--runs", "{runs}", "--host", "0.0.0.0"], "--tls-cert"),
    (["--runs", "{runs}", "--tls-cert", "{runs}/x.crt"], "both --tls-cert and --tls-key"),
    (["--runs", "{runs}", "--token-file", "{runs}/open.token"], "chmod 600"),
])
def test_dashboard_command_refuses_unsafe_or_wrong_setups(tmp_path: Path, args: list[str], message: str) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "open.token").write_text("y" * 40)
    (runs / "open.token").chmod(0o644)
    argv = ["dashboard", *[a.format(runs=runs, missing=tmp_path / "nope") for a in args]]
    res = CliRunner().invoke(_cli(), argv)
    assert res.exit_code == 2, res.output
    assert message in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_command_serves_and_prints_the_login_link(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_synthetic_run(runs, "r1", n_rounds=1, n_sites=2)
    port = _free_port()
    token_file = tmp_path / "tok"
    code = ("import typer; from server.dashboard.cli import dashboard; app = typer.Typer(); "
            "app.command()(dashboard); app()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, "--runs", str(runs), "--port", str(port), "--token-file",
                             str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if not token_file.exists():
                continue
            try:
                token = token_file.read_text().strip()
                status = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {token}"},
                                   timeout=5).status_code
                break
            except httpx.TransportError:
                continue
        anon = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5).status_code
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert status == 200, out
    assert anon == 401
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"http://localhost:{port}/?token={token}" in out
    assert "created in" in out


def test_tls_with_the_consortium_certificates(tmp_path: Path) -> None:
    certs = init_ca(tmp_path / "certs")
    runs = tmp_path / "runs"
    write_synthetic_run(runs, "r1", n_rounds=1, n_sites=2)
    token = "tls-token-0123456789abcdefghij"
    app = create_app(runs, token, secure_cookie=True)
    with running(app, tls_cert=certs["server_cert"], tls_key=certs["server_key"]) as url:
        assert url.startswith("https://localhost:")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certs["ca_cert"])), timeout=10) as c:
            assert c.get(f"{url}/api/runs/r1", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert c.get(f"{url}/api/runs/r1").status_code == 401
            login = c.get(f"{url}/?token={token}", follow_redirects=False)
            assert login.status_code == 303 and "Secure" in login.headers["set-cookie"]
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no answer
            httpx.get(url.replace("https://", "http://") + "/api/runs", timeout=5).raise_for_status()
