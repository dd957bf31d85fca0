"""`manage.py nginx_conf`: render nginx/nginx.conf.template for a prefix directory and ports."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

TEMPLATE = Path(settings.BASE_DIR) / "nginx" / "nginx.conf.template"


class _BracedTemplate(Template):
    """Substitutes only ${name}: nginx's own $variables pass through untouched."""

    pattern = r"\$(?:(?P<escaped>(?!x)x)|(?P<named>(?!x)x)|\{(?P<braced>[a-z_]+)\}|(?P<invalid>(?!x)x))"  # type: ignore[assignment]


def render(prefix: Path, listen: str, daphne: str | list[str], api: str) -> Path:
    """Write prefix/nginx.conf from the template (creating prefix) and return its path.

    daphne is one address or several (one daphne process per core behind one upstream).
    """
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    addresses = [daphne] if isinstance(daphne, str) else daphne
    servers = "\n        ".join(f"server {address};" for address in addresses)
    text = _BracedTemplate(TEMPLATE.read_text()).substitute(
        prefix=str(prefix), listen=listen, daphne_servers=servers, api=api
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

    def handle(self, *args: Any, **options: Any) -> None:
        daphnes = options["daphne"].split(",")
        path = render(Path(options["prefix"]).resolve(), options["listen"], daphnes, options["api"])
        self.stdout.write(str(path))
