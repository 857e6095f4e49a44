# pgrouter: `make dev` runs it against a local cluster, `make test` runs the tests,
# `make bench` compares it with direct PostgreSQL and PgBouncer.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: dev test bench sysdeps venv lint clean-dev

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# PostgreSQL server binaries, psql/pgbench and redis-server; pgbouncer for the benchmark.
# Installed with apt-get when missing and we are root; otherwise we say what is missing.
sysdeps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v psql >/dev/null 2>&1 || missing="$$missing postgresql-client"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ "$(WITH_PGBOUNCER)" = 1 ]; then \
	  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing system packages:$$missing (install them, or run as root)"; exit 1; \
	  fi; \
	fi

dev: $(STAMP) sysdeps
	$(PY) -m tests.dev

test: $(STAMP) sysdeps
	$(PY) -m pytest

bench: $(STAMP)
	$(MAKE) sysdeps WITH_PGBOUNCER=1
	$(PY) -m bench.run $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check router tests bench

clean-dev:
	$(PY) -m tests.cluster down .dev/cluster || true
	rm -rf .dev
