"""`manage.py nginx_conf`: render nginx/nginx.conf.template for a prefix directory and ports."""

from __future__ import annotations

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


def render(
    prefix: Path,
    listen: str,
    daphne: str | list[str],
    api: str,
    tls: tuple[str, Path, Path] | None = None,
    limits: AddressLimits = AddressLimits(),
) -> Path:
    """Write prefix/nginx.conf from the template (creating prefix) and return its path.

    daphne is one address or several (one daphne process per core behind one upstream); tls is
    (listen address, certificate, key) for a second, HTTPS/WSS port.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    addresses = [daphne] if isinstance(daphne, str) else daphne
    servers = "\n        ".join(f"server {address};" for address in addresses)
    text = _BracedTemplate(TEMPLATE.read_text()).substitute(
        prefix=str(prefix),
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
        path = render(
            Path(options["prefix"]).resolve(), options["listen"], daphnes, options["api"], tls, limits
        )
        self.stdout.write(str(path))
