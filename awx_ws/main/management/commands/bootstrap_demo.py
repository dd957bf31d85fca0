"""`manage.py bootstrap_demo`: a demo superuser and its API token, for `make run`."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create (once) a demo superuser with a password kept under var/, and print its API token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        password_file = Path(settings.VAR_DIR) / "demo_password"
        if user is None:
            password = secrets.token_urlsafe(12)
            user = user_model.objects.create_superuser(username, "", password)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"demo user:  {username} (password in {password_file})")
        self.stdout.write(f"API token:  {token.key}")
