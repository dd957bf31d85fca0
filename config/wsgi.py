"""WSGI entry point for the HTTP API (gunicorn)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from config import var

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
var.prepare()
application = get_wsgi_application()
