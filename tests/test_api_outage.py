"""The API while its database cannot serve: 503 with Retry-After for every request that needs it
(a job runner retries), and one WARNING naming DATABASE_URL in the log, not a traceback per
request (the soak's PostgreSQL restarts gave 500s and tracebacks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.servers import Gunicorn, free_port


async def test_a_database_that_cannot_be_reached_gets_503_with_retry_after(state_dir: Path, token: str):
    # A PostgreSQL address nothing listens on: every query fails to connect, as during a restart.
    down = {"DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/postgres"}
    api = await asyncio.to_thread(Gunicorn(state_dir / "logs", down).start)
    try:
        headers = {"Authorization": f"Token {token}"}
        async with httpx.AsyncClient(base_url=api.http_url, timeout=30, headers=headers) as http:
            listed = await http.get("/api/v2/jobs/")
            posted = await http.post("/api/v2/jobs/1/job_events/", json=[{"counter": 1, "event": "x"}])
            assert (await http.get("/api/v2/ping/")).status_code == 200  # needs no database
    finally:
        await asyncio.to_thread(api.stop)
    for response in (listed, posted):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json() == {"detail": "the database is unavailable; retry shortly"}
    log = api.output()
    assert "Traceback" not in log and " ERROR " not in log
    warnings = [line for line in log.splitlines() if "database unavailable (DATABASE_URL)" in line]
    assert len(warnings) == 1  # the second failure, within the minute, is counted, not logged
    assert " WARNING " in warnings[0]
