# make run  — bootstrap and start the whole stack (nginx :8013 → daphne :8051 / api :8050, redis :6390)
# make test — bootstrap and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder

export AWX_WS_VAR ?= $(CURDIR)/var
export AWX_WS_REDIS_PORT ?= 6390
export AWX_WS_DAPHNE_PORT ?= 8051
export AWX_WS_API_PORT ?= 8050
export AWX_WS_NGINX_PORT ?= 8013
# HTTPS/WSS on a second nginx port; without a certificate of yours, a self-signed one in var/tls.
export AWX_WS_TLS_PORT ?= 8443
# (Not exported: a stack started by the tests gets its own var/, so its own default.)
AWX_WS_TLS_CERT ?= $(AWX_WS_VAR)/tls/cert.pem
AWX_WS_TLS_KEY ?= $(AWX_WS_VAR)/tls/key.pem
# REDIS_URL: unset, config/settings.py uses make run's Redis with its generated password (var/).
export AWX_WS_PYTHON := $(PY)
export DJANGO_SETTINGS_MODULE := config.settings
# Debian puts nginx in /usr/sbin, which a non-login shell may not have on PATH.
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: test-unit run test test-postgres bench soak bootstrap sysdeps testdeps rabbitmq postgresql lint clean

run: bootstrap
	# Metrics files of an earlier run would add up with this one's (prometheus_client multiprocess).
	rm -rf $(AWX_WS_VAR)/metrics
	# var/ holds the database (API tokens), keys and logs: the service user's only.
	mkdir -p -m 700 $(AWX_WS_VAR) && chmod 700 $(AWX_WS_VAR)
	umask 077 && mkdir -p $(AWX_WS_VAR)/log $(AWX_WS_VAR)/redis
	umask 077 && $(PY) manage.py redis_conf --dir $(AWX_WS_VAR)/redis >/dev/null
	umask 077 && $(PY) manage.py migrate --noinput -v0
	umask 077 && $(PY) manage.py bootstrap_demo
	@[ -f "$(AWX_WS_TLS_CERT)" ] || (umask 077 && $(PY) manage.py tls_cert --dir $(AWX_WS_VAR)/tls >/dev/null)
	$(PY) manage.py nginx_conf --prefix $(AWX_WS_VAR)/nginx --listen 127.0.0.1:$(AWX_WS_NGINX_PORT) \
		--daphne 127.0.0.1:$(AWX_WS_DAPHNE_PORT) --api 127.0.0.1:$(AWX_WS_API_PORT) \
		--tls-listen 127.0.0.1:$(AWX_WS_TLS_PORT) --cert $(AWX_WS_TLS_CERT) --key $(AWX_WS_TLS_KEY) >/dev/null
	@echo "Starting on http://127.0.0.1:$(AWX_WS_NGINX_PORT)/ and https://127.0.0.1:$(AWX_WS_TLS_PORT)/ (websocket /websocket/); Ctrl-C stops it."
	umask 077 && exec $(VENV)/bin/supervisord -n -c supervisord.conf

# The whole suite on SQLite (the default), under plain daphne and under awx_ws.server (the modules
# marked every_server, delivery, purge, resumes, revocation and slow clients, under uvicorn and
# hypercorn too), and the two-minute soak (tests/test_soak.py; alone: make test-soak); then on
# PostgreSQL all but the slow scenarios (and those marked postgres: nodes sharing one database)
# and the pure rules (unit: they never reach a database), under awx_ws.server only: the database
# is that pass's point.
# Two pytest-xdist workers, a test file each at a time, longest files first (tests/conftest.py),
# each with servers of its own (and ports of its own: tests/servers.py).
test: bootstrap testdeps lint
	$(PYTEST)
	AWX_WS_TEST_DATABASE=postgres AWX_WS_TEST_RUNNERS=awx_ws.server $(PYTEST) -m "(not slow or postgres) and not unit"

# Pure rules only (tests marked unit): no server is started; seconds, not minutes.
test-unit: bootstrap
	$(VENV)/bin/pytest -m unit

# The two-minute soak (tests/test_soak.py) alone: three nodes, every kind of fault, the checker.
test-soak: bootstrap testdeps
	$(PYTEST) -m soak

# Only the PostgreSQL pass (a throwaway cluster started by the test fixtures on a free port).
test-postgres: bootstrap testdeps
	AWX_WS_TEST_DATABASE=postgres AWX_WS_TEST_RUNNERS=awx_ws.server $(PYTEST) -m "(not slow or postgres) and not unit"

# Benchmark against the Channels tutorial baseline and a no-Django floor (about 11 minutes);
# `$(PY) -m bench.run --runners` runs only the comparison of the four ASGI servers (about 4).
bench: bootstrap rabbitmq postgresql
	$(PY) -m bench.run

# A production day under faults (bench/soak, docs/reliability.md): three nodes as `make run`
# starts them, AWX-like jobs and viewers, a seeded nemesis, a checker; SOAK_MINUTES (15),
# SOAK_SEED (1), SOAK_JOBS, SOAK_VIEWERS. Exits non-zero on a loss, a duplicate, an unexplained
# ERROR, a leak or a slow recovery; the report goes to bench/results/soak-<time>/.
soak: bootstrap postgresql
	$(PY) -m bench.soak

# ruff (C90 at 10), the formatting, mypy strict (pyproject.toml); make test runs it first.
lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# django-stubs' plugin loads config.settings, which needs a key (never used) on a fresh clone.
	SECRET_KEY=$${SECRET_KEY:-mypy-loads-the-settings-only} $(VENV)/bin/mypy

bootstrap: sysdeps $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Debian's redis-server and nginx, installed with apt-get only when missing.
sysdeps:
	@need=""; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	command -v redis-sentinel >/dev/null || need="$$need redis-sentinel"; \
	command -v nginx >/dev/null || need="$$need nginx"; \
	if [ -n "$$need" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing$$need with apt-get"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need; \
	fi

# Debian's rabbitmq-server, started by the tests and the benchmark for the RabbitMQ layer (its
# own node name, ports and data each time; the package's system service is not used).
rabbitmq:
	@if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing rabbitmq-server with apt-get"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends rabbitmq-server; \
	fi

# Debian's postgresql, started by the tests' PostgreSQL pass and the benchmark (a throwaway cluster).
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing postgresql with apt-get"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends postgresql; \
	fi

# postgresql and rabbitmq-server for the backends' tests, and chromium for the browser tests (which
# skip, saying why, where it cannot be installed).
testdeps: rabbitmq postgresql
	@sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	if ! command -v chromium >/dev/null; then \
		echo "installing chromium with apt-get"; \
		( $$sudo apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium ) \
		|| echo "WARNING: chromium could not be installed; the browser tests will be skipped"; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
