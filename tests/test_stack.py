"""`make run` as a newcomer uses it: the whole stack under supervisord, the README's client through
nginx, and Ctrl-C stopping everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets

from tests.servers import ROOT, free_ports, port_open
from tests.sse import open_sse

pytestmark = pytest.mark.slow


def readme_client(target: Path) -> Path:
    """The example client exactly as README.md shows it."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example-client -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its example client"
    target.write_text(match.group(1))
    return target


def post_json(port: int, token: str, path: str, data: Any) -> int:
    """The status of a JSON POST through nginx with the token."""
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}{path}"
    request = urllib.request.Request(url, json.dumps(data).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def wait_until(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-4000:]}")


def read_lines_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> list[str]:
    """Lines the process printed, up to the first matching pattern."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line.strip())
            if re.search(pattern, line):
                return lines
        else:
            time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in {lines}")


async def stream_while(base_url: str, token: str, action: Callable[[], None]) -> list[Any]:
    """The first message a stream of jobs-status_changed receives once action has run."""
    async with open_sse(
        base_url, "jobs-status_changed", headers={"Authorization": f"Token {token}"}
    ) as stream:
        await stream.wait_ready(30)
        await asyncio.to_thread(action)
        return await stream.payloads(1, 30)


async def use_tokens_in_urls(front: str, token: str) -> None:
    """Requests with the token in their URL or Referer, through nginx: a stream (opened, and one
    refused), a websocket, and API requests."""
    referer = {"Referer": f"{front}/live/?job=1&token={token}"}
    stream = f"{front}/api/v2/stream/"
    async with httpx.AsyncClient(timeout=10, headers=referer) as http:
        opened = {"groups": "jobs-status_changed", "token": token}
        async with http.stream("GET", stream, params=opened) as live:
            assert live.status_code == 200
            async for line in live.aiter_lines():
                if line.startswith("id:"):
                    break  # subscribed: the stream is open
        refused = await http.get(stream, params={"groups": "broadcast-all", "token": token})
        assert refused.status_code == 400
        assert (await http.get(f"{front}/api/v2/me/", params={"token": token})).status_code == 401
        assert (await http.get(f"{front}/api/v2/ping/", params={"token": token})).status_code == 200
    ws_url = front.replace("http://", "ws://") + f"/websocket/?token={token}"
    async with websockets.connect(ws_url, additional_headers=referer, open_timeout=10) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["accept"] is True


def test_make_run_serves_the_readme_client_and_stops_on_ctrl_c(tmp_path: Path):
    ports = dict(zip(("REDIS", "DAPHNE", "API", "NGINX", "TLS"), free_ports(5), strict=True))
    own = {"DATABASE_URL", "SECRET_KEY", "REDIS_URL", "AWX_WS_TLS_CERT", "AWX_WS_TLS_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in own}
    env.update({f"AWX_WS_{name}_PORT": str(port) for name, port in ports.items()})
    var = tmp_path / "var"
    env["AWX_WS_VAR"] = str(var)
    log = tmp_path / "make-run.log"
    with log.open("w") as out:
        stack = subprocess.Popen(
            ["make", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: stack.poll() is not None or all(port_open(p) for p in ports.values()),
            120,
            "the stack's ports",
            log,
        )
        assert stack.poll() is None, log.read_text()
        token = re.search(r"API token:\s+(\w+)", log.read_text())
        assert token, log.read_text()
        # A generated secret, readable by its owner only, never in the repository.
        assert stat.S_IMODE((var / "secret_key").stat().st_mode) == 0o600
        # var/ (the database with API tokens, keys, logs) is the service user's only.
        assert stat.S_IMODE(var.stat().st_mode) == 0o700
        for private in (
            "db.sqlite3",
            "redis_password",
            "redis/redis.conf",
            "log/daphne.log",
            "nginx/access.log",
        ):
            assert stat.S_IMODE((var / private).stat().st_mode) & 0o077 == 0, private
        # The stack's Redis wants the generated password: another local user gets nothing.
        import redis

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=ports["REDIS"], socket_timeout=5).ping()
        # Its memory is bounded, and a full Redis refuses writes rather than evicting groups.
        owner = redis.Redis(port=ports["REDIS"], password=(var / "redis_password").read_text().strip())
        assert owner.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(owner.config_get("maxmemory")["maxmemory"]) == 512 * 1024 * 1024
        owner.close()

        client = subprocess.Popen(
            [
                sys.executable,
                str(readme_client(tmp_path / "ws_demo.py")),
                token[1],
                f"ws://127.0.0.1:{ports['NGINX']}/websocket/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            hello = read_lines_until(client, r"accept", 30)
            assert json.loads(hello[-1]) == {"accept": True, "user": 1}
            read_lines_until(client, r"groups_current", 30)
            # As README.md emits from a second terminal: no REDIS_URL, the stack's password from var/.
            stack_env = dict(env)
            payload = {"group_name": "jobs", "unified_job_id": 1, "status": "running"}

            def emit() -> None:
                subprocess.run(
                    [sys.executable, "manage.py", "emit", "jobs-status_changed", json.dumps(payload)],
                    cwd=ROOT,
                    env=stack_env,
                    check=True,
                    timeout=60,
                    capture_output=True,
                )

            # The README's SSE example: the same message reaches a stream through nginx.
            streamed = asyncio.run(stream_while(f"http://127.0.0.1:{ports['NGINX']}", token[1], emit))
            assert streamed == [payload]
            received = read_lines_until(client, r"unified_job_id", 30)
            assert json.loads(received[-1]) == payload
        finally:
            client.kill()
            client.wait(10)
            assert client.stdout is not None
            client.stdout.close()

        with urllib.request.urlopen(f"http://127.0.0.1:{ports['NGINX']}/api/", timeout=10) as response:
            assert json.loads(response.read())["websocket"] == "/websocket/"
        # A runner's batch of 79 events (21 KB: over nginx's memory buffer, so through a file its
        # workers write, which as root are not var/'s owner) is stored.
        assert post_json(ports["NGINX"], token[1], "/api/v2/jobs/", {"name": "batch", "kind": "job"}) == 201
        batch = [
            {"counter": n, "event": "runner_on_ok", "stdout": "ok: [web1] " + "=" * 250} for n in range(1, 80)
        ]
        assert post_json(ports["NGINX"], token[1], "/api/v2/jobs/1/job_events/", batch) == 201
        # The live page asks for a login first; its script is served as a static file.
        front = f"http://127.0.0.1:{ports['NGINX']}"
        with urllib.request.urlopen(f"{front}/", timeout=10) as response:
            assert response.url.endswith("/login/?next=/") and b'name="password"' in response.read()
        with urllib.request.urlopen(f"{front}/static/awx_ws/client.js", timeout=10) as response:
            assert b"export class AwxWsClient" in response.read()
        with urllib.request.urlopen(f"{front}/api/v2/ready/", timeout=10) as response:
            assert json.loads(response.read()) == {"redis": "ok", "database": "ok"}
        # HTTPS on the second port, with the self-signed certificate make run wrote to var/tls/.
        trusting = ssl.create_default_context(cafile=str(var / "tls" / "cert.pem"))
        secure = f"https://127.0.0.1:{ports['TLS']}/api/v2/ping/"
        with urllib.request.urlopen(secure, timeout=10, context=trusting) as response:
            assert json.loads(response.read())["ping"] == "pong"
        for program in ("daphne", "api", "redis", "nginx", "relay", "supervisord"):
            assert (var / "log" / f"{program}.log").exists()
        # Clients that cannot set a header send ?token= (EventSource, a page's websocket), and a
        # page opened with one sends it on as the Referer: every process's log must leave it out.
        asyncio.run(use_tokens_in_urls(front, token[1]))
    finally:
        # Ctrl-C in a terminal signals the whole foreground process group.
        with contextlib.suppress(ProcessLookupError):  # already gone if make run failed
            os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            raise
    wait_until(lambda: not any(port_open(p) for p in ports.values()), 30, "ports to close", log)
    # Stopped, so every log is flushed: the token is in none of them, and the requests are.
    logs = {path: path.read_text(errors="replace") for path in var.rglob("*.log")}
    assert [path for path, text in logs.items() if token[1] in text] == []
    assert "token=[redacted]" in logs[var / "log" / "daphne.log"]  # daphne's access log
    assert "token=[redacted]" in logs[var / "log" / "api.log"]  # gunicorn's
    assert "[query left out]" in logs[var / "nginx" / "access.log"]  # nginx's, the Referer
    leftovers = [
        p.info
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(var) in part for part in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
    # Started by root, nginx's workers buffered in a directory of their own outside var/ (make run
    # keeps it for its next start): the test's is removed.
    conf = (var / "nginx" / "nginx.conf").read_text()
    temp = Path(conf.split("client_body_temp_path ", 1)[1].split("/client_body;", 1)[0])
    if not temp.is_relative_to(var):
        shutil.rmtree(temp)
