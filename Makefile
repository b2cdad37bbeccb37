# notifier — the commands a person and CI use. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Embedded servers chosen by `make run` (empty when the real ones answer).
ENV    := if [ -f .notifier-data/env ]; then . ./.notifier-data/env; fi;

.PHONY: help install run stop worker worker-critical worker-deliver beat flower api api-key migrate status test bench chaos chaos-hosts lint docs clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[server,dev,local]"
	touch $@

install: $(VENV)/.installed  ## Create .venv and install notifier with its dev tools

run: install  ## Migrate, start worker + beat + Flower + API in the background, send a demo
	$(BIN)/python scripts/run.py

stop:  ## Stop what `make run` started
	$(BIN)/python scripts/run.py stop

worker: install  ## A worker on every queue, critical first (foreground)
	$(ENV) $(BIN)/celery -A notifier worker -l info

# The queue names come from `notifier queues` (priorities and the channel registry).
worker-critical: install  ## A worker for critical notifications and their deliveries (foreground)
	$(ENV) queues=$$($(BIN)/notifier queues --critical) && \
		$(BIN)/celery -A notifier worker -l info -Q "$$queues" -n critical@%h

worker-deliver: install  ## A worker for deliveries only, one queue per channel (foreground)
	$(ENV) queues=$$($(BIN)/notifier queues --deliver) && \
		$(BIN)/celery -A notifier worker -l info -Q "$$queues" -c 8 --prefetch-multiplier 1 -n deliver@%h

beat: install  ## Celery beat (foreground)
	$(ENV) $(BIN)/celery -A notifier beat -l info --schedule .run/celerybeat-schedule

# The login goes to Flower in its environment (FLOWER_BASIC_AUTH), never on a command line
# that `ps` shows. /metrics and /healthcheck answer without it: keep the default address.
flower: install  ## Flower on 127.0.0.1:5555; login from NOTIFIER_FLOWER_BASIC_AUTH=user:password
	$(ENV) FLOWER_BASIC_AUTH="$${NOTIFIER_FLOWER_BASIC_AUTH:?set NOTIFIER_FLOWER_BASIC_AUTH=user:password}" \
		exec $(BIN)/celery -A notifier flower \
		--address="$${NOTIFIER_FLOWER_ADDRESS:-127.0.0.1}" --port="$${NOTIFIER_FLOWER_PORT:-5555}"

# NOTIFIER_API_ADDRESS / NOTIFIER_API_PORT / NOTIFIER_API_WORKERS (default 127.0.0.1:8000, one
# process); a key to call it with: `make api-key` (docs/api.md).
api: install  ## The HTTP API on 127.0.0.1:8000 (foreground; docs/api.md)
	$(ENV) exec $(BIN)/notifier api

api-key: install  ## A new API key with every scope, printed once (last line)
	$(ENV) $(BIN)/notifier api-keys create "$${NAME:-dev}" --scope send --scope read --scope admin

migrate: install  ## Create the database if missing and migrate it to head
	$(ENV) $(BIN)/notifier db upgrade

status: install  ## Counts by status, queue depths, oldest pending
	$(ENV) $(BIN)/notifier status

# Two passes at once, each with its own database, Redis db and virtual host
# (tests/conftest.py): the whole suite on Redis, and every test that touches a broker
# (the `broker` mark) on RabbitMQ, whose output goes to .run/test-rabbitmq.log and is
# shown when both have ended.
test: install  ## The suite on Redis and its broker tests on RabbitMQ (needs Postgres, Redis, RabbitMQ; see README)
	@mkdir -p .run
	@NOTIFIER_TEST_BROKER=rabbitmq $(BIN)/pytest -m broker -p no:cacheprovider \
		> .run/test-rabbitmq.log 2>&1 & rabbitmq=$$!; \
	trap 'kill $$rabbitmq 2>/dev/null' INT TERM; \
	NOTIFIER_TEST_BROKER=redis $(BIN)/pytest; redis=$$?; \
	wait $$rabbitmq; rabbitmq=$$?; \
	echo "=== the broker tests on RabbitMQ (.run/test-rabbitmq.log) ==="; \
	cat .run/test-rabbitmq.log; \
	echo "=== Redis pass: exit $$redis; RabbitMQ pass: exit $$rabbitmq ==="; \
	test $$redis -eq 0 && test $$rabbitmq -eq 0

# The `bench` extra: matplotlib draws the report's PNG plots, py-spy profiles the hot
# paths; installed when either is missing. The report compares with bench/baseline.json.
bench: install  ## Benchmark against a naive baseline and bench/baseline.json: bench/results/report.md + plots
	@($(BIN)/python -c "import matplotlib" 2>/dev/null && test -x $(BIN)/py-spy) \
		|| $(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench

chaos: install  ## Kill workers, restart Redis and Postgres, stop SMTP, fuzz; account for it all
	$(BIN)/python -m chaos

# Root only (network namespaces): 3 worker hosts, 2 beats, host 1 cut off for 30 s.
chaos-hosts: install  ## Worker hosts in network namespaces + two beats; cut one off; account for it all
	$(BIN)/python -m chaos --only hosts --rate 100

lint: install  ## ruff, the import contracts (lint-imports), mypy on notifier/
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy notifier

# One source: each setting's docstring in notifier/settings.py. The tests fail while the
# page is stale (tests/ops/test_settings_reference.py).
docs: install  ## Regenerate docs/configuration.md from the settings' docstrings
	$(BIN)/python -m notifier.ops.settings_reference > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

clean: stop  ## Stop everything and remove .venv, .run and the embedded servers' data
	rm -rf $(VENV) .run .notifier-data
