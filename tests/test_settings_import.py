"""Importing the settings writes nothing; the entry points make var/ and the secret key at start
(config/var.py). Each case runs in a fresh interpreter: the settings are read once per process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def run(code: str, var: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "PROMETHEUS_MULTIPROC_DIR"}}
    environ.update(AWX_WS_VAR=str(var), DJANGO_SETTINGS_MODULE="config.settings", **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )


def test_importing_the_settings_creates_no_file(tmp_path):
    var = tmp_path / "var"
    done = run("import config.settings", var, SECRET_KEY="given-by-the-environment")
    assert done.returncode == 0, done.stderr
    assert not var.exists()


def test_without_a_key_the_settings_name_secret_key_and_where_it_is_looked_for(tmp_path):
    var = tmp_path / "var"
    done = run("import config.settings", var)
    assert done.returncode == 1
    assert f"SECRET_KEY is not set and {var / 'secret_key'} does not exist" in done.stderr
    assert not var.exists()


def test_an_entry_point_makes_a_private_var_and_one_key_every_process_shares(tmp_path):
    var = tmp_path / "var"
    show_key = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    first = run(f"from config import var; var.prepare(); {show_key}", var)
    second = run(f"from config import var; var.prepare(); {show_key}", var)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and len(first.stdout.strip()) >= 50
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    assert stat.S_IMODE((var / "secret_key").stat().st_mode) == 0o600
    assert (var / "static").is_dir() and (var / "metrics").is_dir()


def test_a_given_secret_key_is_used_and_none_is_written(tmp_path):
    var = tmp_path / "var"
    code = "from config import var; var.prepare(); import config.settings as s; print(s.SECRET_KEY)"
    done = run(code, var, SECRET_KEY="given-by-the-environment")
    assert done.stdout.strip() == "given-by-the-environment", done.stderr
    assert not (var / "secret_key").exists()


def test_sentinels_need_a_master_name_and_host_port_addresses(tmp_path):
    missing = run("import config.settings", tmp_path, SECRET_KEY="k", REDIS_SENTINELS="127.0.0.1:26379")
    assert missing.returncode == 1
    assert "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is empty" in missing.stderr
    malformed = run(
        "import config.settings",
        tmp_path,
        SECRET_KEY="k",
        REDIS_SENTINELS="127.0.0.1:26379,nowhere",
        REDIS_SENTINEL_MASTER="m",
    )
    assert malformed.returncode == 1
    assert "REDIS_SENTINELS='127.0.0.1:26379,nowhere': expected host:port,... ('nowhere')" in malformed.stderr
