"""Settings for awx_ws.

Every value can be overridden from the environment; docs/channels.md has the table. Importing
this touches no network and writes no file: var/ and the generated secret key are made by the
entry points at start (config/var.py), and only read here.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from awx_ws.main import conf as ws_conf
from config import var

BASE_DIR = var.BASE_DIR
VAR_DIR = var.var_dir()


def env_int(name: str, default: int) -> int:
    """Read an integer setting from the environment, naming the variable when it is malformed."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc


def env_float(name: str, default: float) -> float:
    """Read a number setting from the environment, naming the variable when it is malformed."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    """Read a comma-separated list from the environment."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def _secret_key() -> str:
    key = os.environ.get("SECRET_KEY")
    if key:
        return key
    # Generated once per checkout by the first process to start (config/var.py), shared by all.
    path = var.secret_key_file()
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ImproperlyConfigured(
            f"SECRET_KEY is not set and {path} does not exist: set SECRET_KEY, or start through "
            "manage.py, config.asgi or config.wsgi, which generate it there"
        ) from None


SECRET_KEY = _secret_key()
DEBUG = os.environ.get("DEBUG", "").lower() in {"1", "true", "yes"}
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
# Origins (scheme://host[:port], `*.` for subdomains) a session may also come from: form posts, as
# in Django, and session websockets and streams (awx_ws.main.auth.trusted_origin).
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "channels",
    "awx_ws.main",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # 413 for bodies over AWX_WS_MAX_REQUEST_BYTES: DRF's parsers bypass Django's own limit.
    "awx_ws.main.request_limits.RequestSizeLimitMiddleware",
    # Session and CSRF cookies Secure when set over HTTPS (nginx's TLS port), not over its plain one.
    "awx_ws.main.secure_cookies.SecureCookiesOverHttpsMiddleware",
    # Serves /static/ (the live page's JavaScript) from the apps' static folders, no collectstatic.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # 429 for /login/ and /admin/login/ past the failed-login budget (awx_ws.main.logins).
    "awx_ws.main.logins.LoginThrottleMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
if DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
    # A database server's connections are kept, each for up to a minute, checked before reuse.
    # daphne runs every database call of the process (database_sync_to_async: Channels' default
    # thread_sensitive) on asgiref's one sync thread, one after another: a connection opened per
    # handshake (a PostgreSQL backend forked, about 20 ms with the machine busy) made 200
    # concurrent handshakes take over daphne's 5 s open-handshake timeout, and autobahn aborted the
    # last ones without an HTTP response. Kept, that thread's one connection serves them all.
    DATABASES["default"]["CONN_MAX_AGE"] = 60
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    # Several processes (daphne, gunicorn, workers) share the file: WAL lets readers run beside a
    # writer, and a busy timeout waits for a lock instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# AWX's names, so awxkit's `awx_sessionid=...; csrftoken=...` cookie works unchanged.
SESSION_COOKIE_NAME = "awx_sessionid"
CSRF_COOKIE_NAME = "csrftoken"

# nginx sets X-Forwarded-Proto to the scheme the client used (and replaces any the client sent):
# responses to HTTPS requests carry HSTS (SecurityMiddleware) and Secure cookies (secure_cookies.py).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"  # made at start (config/var.py): WhiteNoise warns about a missing one
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "live"
LOGOUT_REDIRECT_URL = "login"

# Prometheus metrics of every process of this node (daphne, gunicorn workers, relay) are written
# to files here and summed by GET /api/v2/metrics (prometheus_client's multiprocess mode). It
# must be in the environment before prometheus_client is imported: settings come first. The
# directory is made when the app is ready (awx_ws/main/apps.py), before any metric is written.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "metrics"))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "awx_ws.main.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # A database that cannot serve a request now: 503 with Retry-After, not a 500 (api/errors.py).
    "EXCEPTION_HANDLER": "awx_ws.main.api.errors.exception_handler",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    # One proxy in front, ours: nginx sets X-Forwarded-For to the address it saw (a client's own
    # X-Forwarded-For is replaced, not appended to), and throttles identify clients by it.
    "NUM_PROXIES": 1,
    # Scoped rates; the emit endpoint's rate is AWX_WS["EMIT_RATE"].
    "DEFAULT_THROTTLE_RATES": {
        "tokens": ws_conf.require_rate("AWX_WS_TOKEN_RATE", os.environ.get("AWX_WS_TOKEN_RATE") or "60/min")
    },
}


def _redis_url() -> str:
    given = os.environ.get("REDIS_URL")
    if given:
        return given
    # `make run`'s own Redis, with the password `manage.py redis_conf` generated in var/.
    port = os.environ.get("AWX_WS_REDIS_PORT") or "6390"
    password_file = VAR_DIR / "redis_password"
    auth = f":{quote(password_file.read_text().strip(), safe='')}@" if password_file.exists() else ""
    return f"redis://{auth}127.0.0.1:{port}/0"


REDIS_URL = _redis_url()


def _sentinels(text: str) -> list[tuple[str, int]]:
    """REDIS_SENTINELS ("host:port,host:port") as addresses, naming the variable when malformed."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        name, sep, port = item.rpartition(":")
        if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(f"REDIS_SENTINELS={text!r}: expected host:port,... ({item!r})")
        found.append((name.strip("[]"), int(port)))
    return found


def redis_host() -> dict[str, Any]:
    """The Redis host of the channel layer (channels_redis's `hosts` entry): REDIS_URL's address,
    or, when REDIS_SENTINELS is set, the master REDIS_SENTINEL_MASTER that those sentinels name,
    logged in to with REDIS_URL's password and database (layers/redis_connect.py)."""
    common = {
        # Fail fast when Redis is unreachable instead of hanging on connect.
        "socket_connect_timeout": env_float("REDIS_CONNECT_TIMEOUT", 2.0),
        # Per process; at the limit callers wait for a free connection (layers/redis.py).
        "max_connections": env_int("REDIS_MAX_CONNECTIONS", 50),
    }
    sentinels = os.environ.get("REDIS_SENTINELS", "").strip()
    if not sentinels:
        return {"address": REDIS_URL, **common}
    master = os.environ.get("REDIS_SENTINEL_MASTER", "").strip()
    if not master:
        raise ImproperlyConfigured(
            "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is empty: name the master the sentinels monitor"
        )
    # Sentinels answer quickly or not at all: a dead one must not hold up finding the master.
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": common["socket_connect_timeout"]}
    sentinel_kwargs["socket_timeout"] = common["socket_connect_timeout"]
    if os.environ.get("REDIS_SENTINEL_PASSWORD"):
        sentinel_kwargs["password"] = os.environ["REDIS_SENTINEL_PASSWORD"]
    return {
        "sentinels": _sentinels(sentinels),
        "master_name": master,
        "sentinel_kwargs": sentinel_kwargs,
        # How to log in to the master (password, database); its host and port are the sentinels' to say.
        "url": REDIS_URL,
        **common,
    }


REDIS_HOST = redis_host()
# Messages a channel may have queued in Redis before channels_redis drops new ones for it.
CHANNEL_LAYER_CAPACITY = env_int("CHANNEL_LAYER_CAPACITY", 1000)
if CHANNEL_LAYER_CAPACITY < 1:
    raise ImproperlyConfigured("CHANNEL_LAYER_CAPACITY must be at least 1")


def channel_layer_config(backend: str) -> dict[str, Any]:
    """CHANNEL_LAYERS["default"] for CHANNEL_LAYER_BACKEND ("redis" or "rabbitmq"), from the environment."""
    if backend == "redis":
        return {
            "BACKEND": "awx_ws.main.layers.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_HOST],
                "prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "asgi"),
                "capacity": CHANNEL_LAYER_CAPACITY,
                "expiry": 60,
                # Group members older than this are dropped; the fan-out refreshes its own (fanout.py).
                "group_expiry": env_int("CHANNEL_LAYER_GROUP_EXPIRY", 86400),
            },
        }
    if backend == "rabbitmq":
        local_capacity = env_int("RABBITMQ_LOCAL_CAPACITY", 100)
        prefetch_count = env_int("RABBITMQ_PREFETCH_COUNT", local_capacity)
        if not 1 <= prefetch_count <= local_capacity:
            # Every unacknowledged message sits in the process's in-memory queue (rabbitmq.py).
            raise ImproperlyConfigured(
                f"RABBITMQ_PREFETCH_COUNT={prefetch_count} must be between 1 and "
                f"RABBITMQ_LOCAL_CAPACITY={local_capacity}"
            )
        # channels_rabbitmq: one exclusive queue per process, groups bound on one direct exchange.
        return {
            "BACKEND": "awx_ws.main.layers.RabbitmqChannelLayer",
            "CONFIG": {
                "host": os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672"),
                # Messages a process holds in memory, received but not yet taken by its fan-out...
                "local_capacity": local_capacity,
                # ...of which RabbitMQ hands over this many before it waits for acks (at most the above).
                "prefetch_count": prefetch_count,
                # Messages a process's queue holds in RabbitMQ; more are refused (and counted).
                "remote_capacity": env_int("RABBITMQ_REMOTE_CAPACITY", CHANNEL_LAYER_CAPACITY),
                # Seconds a message may wait in RabbitMQ before it is dropped.
                "expiry": env_int("RABBITMQ_EXPIRY", 60),
                "groups_exchange": os.environ.get("RABBITMQ_GROUPS_EXCHANGE", "groups"),
            },
        }
    raise ImproperlyConfigured(f"CHANNEL_LAYER_BACKEND={backend!r}: use 'redis' (the default) or 'rabbitmq'")


CHANNEL_LAYER_BACKEND = os.environ.get("CHANNEL_LAYER_BACKEND", "redis").lower()
CHANNEL_LAYERS = {"default": channel_layer_config(CHANNEL_LAYER_BACKEND)}


def _cache_sentinels(host: dict[str, Any]) -> dict[str, Any]:
    """OPTIONS that make Django's Redis cache find the master through the sentinels, if any."""
    if "master_name" not in host:
        return {}
    return {
        "pool_class": "awx_ws.main.layers.redis_connect.SyncSentinelPool",
        "sentinels": host["sentinels"],
        "master_name": host["master_name"],
        "sentinel_kwargs": host["sentinel_kwargs"],
    }


# Throttle and failed-login counts, shared by every API worker and daphne process of the node: in
# the node's Redis, or, on RabbitMQ (no Redis), in its database (`manage.py createcachetable`).
if CHANNEL_LAYER_BACKEND == "redis":
    CACHES = {
        "default": {
            # Django's RedisCache, counting per process while Redis is down (layers/redis_cache.py).
            "BACKEND": "awx_ws.main.layers.redis_cache.FallbackRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "awx_ws-cache",
            "OPTIONS": {"socket_connect_timeout": 2.0, "socket_timeout": 5.0, **_cache_sentinels(REDIS_HOST)},
        }
    }
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "awx_ws_cache"}
    }

# Password logins through Django's authenticate() (the token endpoint, /login/, /admin/login/)
# stop checking passwords past AWX_WS_LOGIN_FAILURE_RATE failures per address and per username.
AUTHENTICATION_BACKENDS = ["awx_ws.main.logins.ThrottledModelBackend"]

# One namespace for the service's own settings: what the environment gives, every other value
# from the defaults in awx_ws.main.conf.SETTINGS (docs/channels.md has the table). Validated here,
# so a bad value stops every process at start, naming its variable. Read through ws_settings.
AWX_WS: dict[str, Any] = ws_conf.from_environment(os.environ)
ws_conf.validate(AWX_WS)

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"},
    },
    # A RabbitMQ outage: one line a minute instead of a traceback a second (logfilters.py).
    "filters": {"broker_reconnects": {"()": "awx_ws.main.logfilters.BrokerReconnects"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["broker_reconnects"]}
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "awx_ws": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
