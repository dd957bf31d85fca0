#!/usr/bin/env python
"""Django's command-line utility for awx_ws."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    from config import var

    var.prepare()

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
