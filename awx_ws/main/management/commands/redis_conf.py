"""`manage.py redis_conf`: the config file of `make run`'s redis-server: a password, and a
memory limit that never evicts (maxmemory-policy noeviction).

Without one, any local user could read job output from the stack's Redis or write into its
groups. The password is generated once, kept in var/redis_password (owner-only), and read by
config/settings.py to build the default REDIS_URL, so every process of the stack, and
`manage.py emit` in another terminal, uses it. It goes in a config file, not on redis-server's
command line, which other users can read in the process list.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


def write_private(path: Path, text: str) -> None:
    """Write text to path, readable by its owner only (made so from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class Command(BaseCommand):
    help = "Write redis.conf for make run's redis-server (a generated password, a memory limit; owner-only)."

    def add_arguments(self, parser: CommandParser) -> None:
        """--dir: where redis.conf goes (var/redis)."""
        parser.add_argument("--dir", type=Path, default=settings.VAR_DIR / "redis")
        parser.add_argument("--maxmemory", default="512mb", help="Redis's memory limit (maxmemory)")

    def handle(self, *args: Any, **options: Any) -> None:
        """Generate the password once; write the config file that requires it."""
        password_file = settings.VAR_DIR / "redis_password"
        if not password_file.exists():
            write_private(password_file, secrets.token_hex(32))
        password = password_file.read_text().strip()
        # Bounded memory, and never evicting: a full Redis refuses new writes (emits answer 503)
        # but drops no group membership, queue or history that is already there.
        conf = f"requirepass {password}\nmaxmemory {options['maxmemory']}\nmaxmemory-policy noeviction\n"
        write_private(options["dir"] / "redis.conf", conf)
        self.stdout.write(str(options["dir"] / "redis.conf"))
