# Every set-up step of Ferry lives here: `make demo` and `make test` work on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps demo test test-slow test-faults bench kafka-up kafka-down schemas dashboards dashboard-pngs clean

# Java 17 runs the broker, Maven fetches its jars from Maven Central (no Docker needed).
# Prometheus (server + promtool, Debian's package) runs in tests/test_prometheus.py.
system-deps:
	@command -v java >/dev/null && command -v mvn >/dev/null || { \
	  echo "installing Java 17 and Maven"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Prometheus"; \
	  apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	$(BIN)/ferry demo

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-faults: install
	$(BIN)/python -m pytest -m faults -s tests/test_faults.py

bench: install
	$(BIN)/python -m tests.bench.bench_engine
	$(BIN)/python -m tests.bench.bench_pipeline
	$(BIN)/python -m tests.bench.bench_push
	$(BIN)/python -m tests.bench.bench_tp
	$(BIN)/python -m tests.bench.bench_gateway
	$(BIN)/python -m tests.bench.bench_router
	$(BIN)/python -m tests.bench.bench_shadow
	$(BIN)/python -m tests.bench.bench_streaming
	$(BIN)/python -m tests.bench.bench_metrics

kafka-up: install
	$(BIN)/ferry kafka up

kafka-down: install
	$(BIN)/ferry kafka down

schemas: install
	$(BIN)/ferry schemas export

# Rewrites compose/grafana/dashboards/*.json from compose/grafana/dashboards.py.
dashboards: install
	$(BIN)/python compose/grafana/dashboards.py

# Redraws compose/grafana/png/*.png from a real run: the stack and load of
# tests/test_prometheus.py for DASHBOARD_SECONDS with its Prometheus data kept in
# build/dashboard-run, then compose/grafana/render.py replays that data (no Grafana here).
DASHBOARD_SECONDS ?= 150
dashboard-pngs: install
	rm -rf build/dashboard-run
	FERRY_PROMETHEUS_RECORD=build/dashboard-run \
	  FERRY_PROMETHEUS_RECORD_SECONDS=$(DASHBOARD_SECONDS) \
	  $(BIN)/python -m pytest -q tests/test_prometheus.py -k scrapes
	$(BIN)/python compose/grafana/render.py --data build/dashboard-run

clean:
	rm -rf $(VENV) *.egg-info
