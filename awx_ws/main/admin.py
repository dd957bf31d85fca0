"""Admin registrations, so a superuser can manage organizations and jobs by hand."""

from __future__ import annotations

from django.contrib import admin

from awx_ws.main.models import Job, Organization


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]  # ModelAdmin[...] fails at run time
    list_display = ("id", "name")
    filter_horizontal = ("members",)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):  # type: ignore[type-arg]  # ModelAdmin[...] fails at run time
    list_display = ("id", "kind", "name", "organization", "status")
    list_filter = ("kind", "status")
