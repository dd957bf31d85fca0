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


def render(prefix: Path, listen: str, daphne: str, api: str) -> Path:
    """Write prefix/nginx.conf from the template (creating prefix) and return its path."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    text = _BracedTemplate(TEMPLATE.read_text()).substitute(
        prefix=str(prefix), listen=listen, daphne=daphne, api=api
    )
    target = prefix / "nginx.conf"
    target.write_text(text)
    return target


class Command(BaseCommand):
    help = "Render the nginx config into PREFIX/nginx.conf."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--prefix", default=str(Path(settings.VAR_DIR) / "nginx"))
        parser.add_argument("--listen", default="127.0.0.1:8013")
        parser.add_argument("--daphne", default="127.0.0.1:8051")
        parser.add_argument("--api", default="127.0.0.1:8050")

    def handle(self, *args: Any, **options: Any) -> None:
        path = render(Path(options["prefix"]).resolve(), options["listen"], options["daphne"], options["api"])
        self.stdout.write(str(path))
