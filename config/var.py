"""The node's private directory (AWX_WS_VAR, ./var by default), made ready when a process starts.

Settings only read from it; importing them writes nothing. Each entry point (manage.py,
config.asgi, config.wsgi) calls `prepare()` before Django loads the settings, so the first start
creates var/ (0700), the secret key (0600, when SECRET_KEY is not given) and the static files'
directory, and every process of the stack then shares that key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def var_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The directory AWX_WS_VAR names (./var when unset)."""
    return Path(environ.get("AWX_WS_VAR") or BASE_DIR / "var").resolve()


def secret_key_file(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the generated secret key is kept when SECRET_KEY is not given."""
    return var_dir(environ) / "secret_key"


def prepare(environ: Mapping[str, str] = os.environ) -> None:
    """Create var/, its static directory and, without SECRET_KEY, the secret key file (once)."""
    var = var_dir(environ)
    var.mkdir(parents=True, exist_ok=True, mode=0o700)
    (var / "static").mkdir(exist_ok=True)  # STATIC_ROOT: WhiteNoise warns about a missing one
    if environ.get("SECRET_KEY"):
        return
    path = secret_key_file(environ)
    try:
        # O_EXCL: two processes starting at once agree on the first key written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(50))
