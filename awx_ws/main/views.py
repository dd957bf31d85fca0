"""The live page: jobs and their event lines, updated over the websocket (static/awx_ws/live.js)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@login_required
@ensure_csrf_cookie  # the page's websocket sends the csrftoken cookie as its xrftoken
def live(request: HttpRequest) -> HttpResponse:
    """The page; everything on it is loaded by its script from the API and the websocket."""
    return render(request, "awx_ws/live.html")
