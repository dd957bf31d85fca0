"""The table of Django's database cache, used for throttle counts on nodes without Redis.

Created in every database (createcachetable with the name given makes it whatever CACHES says
today), so a node moved to CHANNEL_LAYER_BACKEND=rabbitmq later finds it there.
"""

from django.core.management import call_command
from django.db import migrations

TABLE = "awx_ws_cache"


def create(apps, schema_editor):
    call_command("createcachetable", TABLE, database=schema_editor.connection.alias, verbosity=0)


def drop(apps, schema_editor):
    schema_editor.execute(f"DROP TABLE IF EXISTS {schema_editor.quote_name(TABLE)}")


class Migration(migrations.Migration):
    dependencies = [("main", "0003_peer_nonces")]

    operations = [migrations.RunPython(create, drop)]
