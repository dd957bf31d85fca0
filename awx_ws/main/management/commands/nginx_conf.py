"""`manage.py nginx_conf`: render nginx/nginx.conf.template for a prefix directory and ports."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

TEMPLATE = Path(settings.BASE_DIR) / "nginx" / "nginx.conf.template"


class _BracedTemplate(Template):
    """Substitutes only ${name}: nginx's own $variables pass through untouched."""

    pattern = r"\$(?:(?P<escaped>(?!x)x)|(?P<named>(?!x)x)|\{(?P<braced>[a-z_]+)\}|(?P<invalid>(?!x)x))"  # type: ignore[assignment]


def tls_lines(listen: str, certificate: Path, key: Path) -> str:
    """The server block's HTTPS/WSS listener: the same locations on a second port, over TLS."""
    return "\n        ".join(
        [
            f"listen {listen} ssl;",
            f"ssl_certificate {certificate};",
            f"ssl_certificate_key {key};",
            "ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    )


@dataclass(frozen=True)
class AddressLimits:
    """What one client address may open: websockets and streams at once, and new ones per second
    (with a burst); addresses in `unlimited` (this machine's own clients) are not limited."""

    connections: int = 1024
    handshake_rate: str = "50r/s"  # nginx's limit_req rate: r/s or r/m
    handshake_burst: int = 100
    unlimited: tuple[str, ...] = ("127.0.0.1", "::1")

    def unlimited_lines(self) -> str:
        """The map entries giving the unlimited addresses an empty key (nginx counts none)."""
        lines = [f'"{address}" "";' for address in self.unlimited]
        return "\n        ".join(lines) or "# every address is limited"


# nginx's own default worker user; Debian builds it with the group nogroup (the user's own group).
DEFAULT_WORKER_USER = "nobody"


@dataclass(frozen=True)
class Workers:
    """Who nginx's worker processes run as: `user` when root starts nginx (never root itself),
    None when someone else does (then the workers are that user, var/'s owner)."""

    user: str | None

    @classmethod
    def for_this_process(cls, user: str = DEFAULT_WORKER_USER) -> Workers:
        """The workers nginx will have when this process's user starts it."""
        return cls(user if os.geteuid() == 0 else None)

    def account(self) -> pwd.struct_passwd:
        """The worker user's account (only when root starts nginx)."""
        try:
            entry = pwd.getpwnam(self.user or "")
        except KeyError as exc:
            raise CommandError(
                f"nginx's workers would run as {self.user!r}, which this system has no account for "
                "(nginx_conf --worker-user)"
            ) from exc
        if entry.pw_uid == 0:
            raise CommandError(f"nginx's workers must not run as root (nginx_conf --worker-user {self.user})")
        return entry

    def directive(self) -> str:
        """The `user` line: explicit as root, absent otherwise (nginx ignores it, with a warning)."""
        if self.user is None:
            return "# Started by a user other than root: the workers run as that user, var/'s owner."
        gid = self.account().pw_gid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError as exc:
            raise CommandError(
                f"the group {gid} of nginx's worker user {self.user!r} has no name (nginx_conf --worker-user)"
            ) from exc
        return f"user {self.user} {group};"

    def temp_root(self, prefix: Path) -> Path:
        """Where the workers buffer bodies and responses: prefix/tmp when they are var/'s owner,
        else a directory of the worker user's own under the system's temporary directory."""
        if self.user is None:
            return prefix / "tmp"
        # Started by root, nginx makes each temporary path its workers' own (ngx_create_paths), but
        # they must also traverse every directory above it, and var/ (0700) is closed to them: the
        # first body over 8k failed with "open() ... failed (13: Permission denied)" and a 500.
        digest = hashlib.sha256(f"{prefix}\0{self.user}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()).resolve() / f"awx_ws-nginx-{digest}"

    def temp_comment(self) -> str:
        """Why the temporary files live where they do, for the rendered config."""
        if self.user is None:
            return (
                "# Started by var/'s owner, the workers are that user: the prefix's tmp/ is theirs already."
            )
        return "\n    ".join(
            [
                f"# Started by root, the workers run as {self.user}, who may not enter var/ (0700, the",
                "# service user's only): root's directory in the system's temporary one, which only their",
                "# group may enter (0710); nginx makes each directory in it theirs (0700).",
            ]
        )

    def prepare(self, prefix: Path) -> Path:
        """Create the temporary root (root's, 0710, the workers' group may only enter it) and
        return it; nginx makes each temporary directory in it the workers' own (0700)."""
        root = self.temp_root(prefix)
        if self.user is None:
            root.mkdir(mode=0o700, exist_ok=True)
            return root
        entry = self.account()
        blocked = _untraversable_parent(root, entry)
        if blocked is not None:
            raise CommandError(
                f"nginx's workers ({self.user}) cannot reach {root}: {blocked} is closed to them "
                "(set TMPDIR to a directory every user may traverse, such as /tmp)"
            )
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)
        # Never through a link: the directory sits where every user may create entries.
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise CommandError(f"nginx's temporary directory {root} is not a directory: {exc}") from exc
        try:
            # Root's, and only root may add, remove or rename entries in it. Were it the workers',
            # they could swap a temporary directory for a link (to /etc/shadow, say) that the root
            # master follows when it chowns its temporary paths at the next start or reload
            # (ngx_create_paths: stat, chown, chmod). Debian lays out /var/lib/nginx the same way.
            info = os.fstat(fd)
            if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise CommandError(f"{root} belongs to another user: remove it, nginx_conf makes it anew")
            os.fchown(fd, 0, entry.pw_gid)
            os.fchmod(fd, 0o710)
        finally:
            os.close(fd)
        return root


def _untraversable_parent(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first directory above path that account may not traverse, if any."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for parent in reversed(path.parents):
        info = parent.stat()
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return parent
    return None


def render(
    prefix: Path,
    listen: str,
    daphne: str | list[str],
    api: str,
    tls: tuple[str, Path, Path] | None = None,
    limits: AddressLimits = AddressLimits(),
    workers: Workers | None = None,
) -> Path:
    """Write prefix/nginx.conf from the template (creating prefix) and return its path.

    daphne is one address or several (one daphne process per core behind one upstream); tls is
    (listen address, certificate, key) for a second, HTTPS/WSS port; workers, by default those
    nginx started by this process's user would have.
    """
    workers = workers or Workers.for_this_process()
    prefix.mkdir(parents=True, exist_ok=True)
    temp = workers.prepare(prefix)
    addresses = [daphne] if isinstance(daphne, str) else daphne
    servers = "\n        ".join(f"server {address};" for address in addresses)
    text = _BracedTemplate(TEMPLATE.read_text()).substitute(
        prefix=str(prefix),
        worker_user=workers.directive(),
        temp=str(temp),
        temp_comment=workers.temp_comment(),
        listen=listen,
        daphne_servers=servers,
        api=api,
        tls=tls_lines(*tls) if tls else "# no TLS listener (nginx_conf --tls-listen)",
        unlimited_addresses=limits.unlimited_lines(),
        connections_per_address=str(limits.connections),
        handshake_rate=limits.handshake_rate,
        handshake_burst=str(limits.handshake_burst),
    )
    target = prefix / "nginx.conf"
    target.write_text(text)
    return target


class Command(BaseCommand):
    help = "Render the nginx config into PREFIX/nginx.conf."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--prefix", default=str(Path(settings.VAR_DIR) / "nginx"))
        parser.add_argument("--listen", default="127.0.0.1:8013")
        parser.add_argument(
            "--daphne", default="127.0.0.1:8051", help="daphne address, or several separated by commas"
        )
        parser.add_argument("--api", default="127.0.0.1:8050")
        parser.add_argument("--tls-listen", help="also serve HTTPS/WSS here (needs --cert and --key)")
        parser.add_argument("--cert", help="PEM certificate (chain) for --tls-listen")
        parser.add_argument("--key", help="PEM private key for --tls-listen")
        defaults = AddressLimits()
        parser.add_argument(
            "--connections-per-address", type=int, default=defaults.connections,
            help="websockets and streams one client address may hold at once (then 429)",
        )  # fmt: skip
        parser.add_argument(
            "--handshake-rate", default=defaults.handshake_rate,
            help="new websockets and streams per client address, as nginx's rate: 50r/s, 600r/m (then 429)",
        )  # fmt: skip
        parser.add_argument("--handshake-burst", type=int, default=defaults.handshake_burst)
        parser.add_argument(
            "--unlimited", default=",".join(defaults.unlimited),
            help="client addresses not limited, separated by commas (this machine's by default)",
        )  # fmt: skip
        parser.add_argument(
            "--worker-user", default=DEFAULT_WORKER_USER,
            help="who nginx's workers run as when root starts nginx (not root; best an account of their own)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        daphnes = options["daphne"].split(",")
        tls = None
        if options["tls_listen"]:
            if not options["cert"] or not options["key"]:
                raise CommandError("--tls-listen needs --cert and --key (AWX_WS_TLS_CERT, AWX_WS_TLS_KEY)")
            certificate, key = Path(options["cert"]).resolve(), Path(options["key"]).resolve()
            for path in (certificate, key):
                if not path.is_file():
                    raise CommandError(f"TLS file {path} does not exist")
            tls = (options["tls_listen"], certificate, key)
        limits = AddressLimits(
            options["connections_per_address"],
            options["handshake_rate"],
            options["handshake_burst"],
            tuple(address for address in options["unlimited"].split(",") if address),
        )
        workers = Workers.for_this_process(options["worker_user"])
        path = render(
            Path(options["prefix"]).resolve(),
            options["listen"],
            daphnes,
            options["api"],
            tls,
            limits,
            workers,
        )
        self.stdout.write(str(path))
