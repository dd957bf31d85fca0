"""Bodies and responses too big for nginx's memory buffers pass through files its workers write:
every body up to the bound (client_max_body_size = AWX_WS_MAX_REQUEST_BYTES, 4 MiB) is served,
past it nginx answers 413, with nginx started as root (its workers then run as nobody) and as
another user. Nobody but the workers reads those files."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.factories import create_job, create_org, create_token, create_user
from tests.servers import Gunicorn, Nginx, Process, free_port, nginx_argv, run_manage

pytestmark = pytest.mark.usefixtures("shared_db")

BOUND = 4 * 1024 * 1024  # nginx's client_max_body_size 4m, the API's AWX_WS_MAX_REQUEST_BYTES
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def event(counter: int, stdout: str) -> dict[str, Any]:
    return {"counter": counter, "event": "runner_on_ok", "stdout": stdout, "event_data": {"host": "web1"}}


def body_of(events: Any, size: int | None = None) -> bytes:
    """events as JSON; with size, one event's stdout padded so the body is exactly size bytes."""
    body = json.dumps(events).encode()
    if size is None:
        return body
    events["stdout"] += "x" * (size - len(body))
    body = json.dumps(events).encode()
    assert len(body) == size
    return body


def wait_for_line(log: Path, texts: tuple[str, ...], timeout: float = 30.0) -> str:
    """The log's text once it holds one of texts (nginx writes its log as things happen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if any(t in text for t in texts):
            return text
        time.sleep(0.05)
    raise AssertionError(f"none of {texts} in {log} within {timeout}s:\n{text[-4000:]}")


def post_events(base: str, token: str, job: int, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    return httpx.post(f"{base}/api/v2/jobs/{job}/job_events/", content=body, headers=headers, timeout=60)


def send_bodies(base: str, token: str, job: int) -> int:
    """The batches and single events a runner posts, up to the bound and past it; the bytes of
    stdout stored."""
    batch = [event(n, f'ok: [web{n}] => {{"changed": false, "ping": "pong"}}') for n in range(1, 501)]
    response = post_events(base, token, job, body_of(batch))
    assert response.status_code == 201, response.text[:500]
    assert [e["counter"] for e in response.json()] == list(range(1, 501))

    two_mib = "y" * (2 * 1024 * 1024)
    response = post_events(base, token, job, body_of(event(501, two_mib)))
    assert response.status_code == 201, response.text[:500]
    assert response.json()["stdout"] == two_mib

    response = post_events(base, token, job, body_of(event(502, ""), size=BOUND))
    assert response.status_code == 201, response.text[:500]
    stored = len(response.json()["stdout"]) + len(two_mib)

    # One byte more: nginx refuses it before the API reads any (its own page, not the API's JSON).
    response = post_events(base, token, job, body_of(event(503, ""), size=BOUND + 1))
    assert response.status_code == 413
    assert "413 Request Entity Too Large" in response.text and "nginx" in response.text
    return stored


def list_events_slowly(base: str, token: str, job: int, error_log: Path) -> tuple[int, dict[str, Any]]:
    """GET every event of the job with a client that reads nothing until nginx has had to put
    the response in a file: a client with a small window on a response bigger than the most the
    kernel buffers for nginx's socket (net.ipv4.tcp_wmem's maximum)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.sock = sock
    try:
        path = f"/api/v2/jobs/{job}/job_events/?page_size=1000"
        connection.request("GET", path, headers={"Authorization": f"Token {token}"})
        log = wait_for_line(error_log, ("an upstream response is buffered to a temporary file", "failed (13"))
        assert "failed (13" not in log, log[-2000:]
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def check_buffered_both_ways(base: str, error_log: Path) -> None:
    """Bodies to the bound and a response of megabytes served through files, the workers'."""
    owner = create_user()
    token = create_token(owner)
    job = create_job(create_org(owner)).pk
    stored = send_bodies(base, token, job)
    assert "a client request body is buffered to a temporary file" in error_log.read_text()

    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    assert stored > wmem_max + 1024 * 1024, "the listing must outgrow what the kernel buffers"
    status, page = list_events_slowly(base, token, job, error_log)
    assert status == 200
    assert [e["counter"] for e in page["results"]] == list(range(1, 503))
    assert sum(len(e["stdout"]) for e in page["results"][500:]) == stored
    assert "Permission denied" not in error_log.read_text()


def as_user(account: pwd.struct_passwd, *command: str) -> subprocess.CompletedProcess[str]:
    ids = [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    return subprocess.run(["setpriv", *ids, *command], capture_output=True, text=True)


def check_private(root: Path, workers_uid: int, root_owned: bool) -> None:
    """Each directory nginx keeps under root: the workers' own, 0700. Started by root, root
    itself is root's, 0710, so the workers cannot swap a directory for a link. Another user
    cannot even list them."""
    for path in (root, *(root / name for name in TEMP_DIRS)):
        info = path.lstat()
        assert stat.S_ISDIR(info.st_mode), path
        owner = (0, 0o710) if path == root and root_owned else (workers_uid, 0o700)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == owner, path
    other = pwd.getpwnam("daemon")
    assert other.pw_uid != workers_uid
    if os.geteuid() == 0:
        for path in (root, root / "client_body"):
            listing = as_user(other, "ls", str(path))
            assert listing.returncode != 0 and "Permission denied" in listing.stderr, path
    if root_owned:
        moved = as_user(pwd.getpwuid(workers_uid), "mv", str(root / "client_body"), str(root / "elsewhere"))
        assert moved.returncode != 0 and "Permission denied" in moved.stderr


@pytest.fixture
def own_api(state_dir: Path) -> Iterator[Gunicorn]:
    server = Gunicorn(state_dir / "logs").start()
    yield server
    server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx started as root (containers, CI machines)")
def test_as_root_every_body_to_the_bound_and_large_responses_pass_and_stay_private(
    own_api: Gunicorn, state_dir: Path
) -> None:
    # As `make run` lays it out: var/ the service user's only, the prefix inside it.
    var = state_dir / f"var-{secrets.token_hex(3)}"
    var.mkdir(mode=0o700)
    prefix = var / "nginx"
    port = free_port()
    rendered = run_manage(
        "nginx_conf", "--prefix", str(prefix), "--listen", f"127.0.0.1:{port}",
        "--daphne", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{own_api.port}",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    conf = (prefix / "nginx.conf").read_text()
    assert "\nuser nobody nogroup;\n" in conf
    temp = Path(conf.split("client_body_temp_path ", 1)[1].split("/client_body;", 1)[0])
    assert not temp.is_relative_to(var)
    nginx = Process(f"nginx:{port}", nginx_argv(prefix), prefix / "nginx.out").start()
    try:
        nginx.wait_for_port(port)
        nobody = pwd.getpwnam("nobody").pw_uid
        workers = psutil.Process(nginx.pid).children()
        assert workers and {w.uids().real for w in workers} == {nobody}  # never root

        check_buffered_both_ways(f"http://127.0.0.1:{port}", prefix / "error.log")
        check_private(temp, nobody, root_owned=True)
        # var/ stays the service user's only: the workers needed nothing in it.
        assert stat.S_IMODE(var.stat().st_mode) == 0o700
        assert not (prefix / "tmp").exists()
    finally:
        nginx.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_as_another_user_every_body_to_the_bound_and_large_responses_pass_and_stay_private(
    node: Any, own_api: Gunicorn, state_dir: Path
) -> None:
    """nginx started by a user other than root (nobody here, when the tests run as root), on a
    prefix of that user's: its workers are that user and buffer under the prefix."""
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="awx_ws-nginx-user-")) if as_root else state_dir
    account = pwd.getpwnam("nobody") if as_root else pwd.getpwuid(os.geteuid())
    os.chown(base, account.pw_uid, account.pw_gid)
    prefix = base / f"nginx-{secrets.token_hex(3)}"
    nginx = Nginx(prefix, node.port, own_api.port, as_user=account.pw_name if as_root else None)
    try:
        nginx.start()
        assert "\nuser " not in (prefix / "nginx.conf").read_text()
        workers = psutil.Process(nginx.pid).children(recursive=True)
        assert {w.uids().real for w in workers if w.name() == "nginx"} == {account.pw_uid}
        check_buffered_both_ways(nginx.http_url, prefix / "error.log")
        check_private(prefix / "tmp", account.pw_uid, root_owned=False)
    finally:
        nginx.stop()
        if as_root:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the workers' own directory is made when root starts nginx")
def test_a_directory_the_workers_cannot_reach_or_do_not_own_is_refused(state_dir: Path, monkeypatch) -> None:
    """Refused when rendering, naming what to change, rather than a 500 on the first large body."""
    from django.core.management.base import CommandError

    from awx_ws.main.management.commands.nginx_conf import Workers

    workers = Workers("nobody")
    prefix = state_dir / f"var-{secrets.token_hex(3)}" / "nginx"
    closed = Path(tempfile.mkdtemp(prefix="awx_ws-closed-"))  # 0700, root's
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(closed))
        with pytest.raises(CommandError, match=f"{closed} is closed to them.*TMPDIR"):
            workers.prepare(prefix)
    finally:
        monkeypatch.undo()
        closed.rmdir()
    # Planted where the directory goes, by another user (the workers' own included) or as a
    # link, or left writable to others: not used.
    root = workers.temp_root(prefix)
    root.mkdir()
    try:
        for planter in ("daemon", "nobody"):
            os.chown(root, pwd.getpwnam(planter).pw_uid, -1)
            with pytest.raises(CommandError, match="belongs to another user"):
                workers.prepare(prefix)
        os.chown(root, 0, -1)
        os.chmod(root, 0o777)
        with pytest.raises(CommandError, match="belongs to another user"):
            workers.prepare(prefix)
    finally:
        root.rmdir()
    root.symlink_to(state_dir)
    try:
        with pytest.raises(CommandError, match="is not a directory"):
            workers.prepare(prefix)
        assert pwd.getpwuid(state_dir.stat().st_uid).pw_name == "root"
    finally:
        root.unlink()
    with pytest.raises(CommandError, match="no account for"):
        Workers("no-such-account").prepare(prefix)
    with pytest.raises(CommandError, match="must not run as root"):
        Workers("root").prepare(prefix)
