"""Test data, created through the ORM (sync); async tests call them through `adb`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

T = TypeVar("T")
_names = itertools.count(1)


async def adb(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a database function from async code (in a worker thread, as Django requires)."""
    return await sync_to_async(fn)(*args, **kwargs)


def create_user(*, superuser: bool = False, active: bool = True) -> Any:
    from django.contrib.auth import get_user_model

    username = f"user{next(_names)}-{os.getpid()}"
    if superuser:
        return get_user_model().objects.create_superuser(username, "", "pw")
    return get_user_model().objects.create_user(username, "", "pw", is_active=active)


def create_token(user: Any) -> str:
    from rest_framework.authtoken.models import Token

    return Token.objects.get_or_create(user=user)[0].key


def create_org(*members: Any) -> Any:
    from awx_ws.main.models import Organization

    org = Organization.objects.create(name=f"org{next(_names)}-{os.getpid()}")
    org.members.add(*members)
    return org


def create_job(organization: Any, kind: str = "job") -> Any:
    from awx_ws.main.models import Job

    return Job.objects.create(organization=organization, kind=kind, name="demo")


def session_cookie(user: Any) -> str:
    """A logged-in Django session key for user, as a browser would hold it."""
    from django.test import Client

    browser = Client()
    browser.force_login(user)
    return browser.cookies["awx_sessionid"].value


def set_login_password(user: Any, password: str) -> None:
    """A password the servers can check (they use Django's default hashers, not the tests' MD5)."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.PBKDF2PasswordHasher"]):
        user.set_password(password)
        user.save(update_fields=["password"])
