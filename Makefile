# infermesh — every target does its own set-up on a fresh machine (Python 3.11 + OS packages).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto)
DEMO_DIR ?= .run/demo
DEMO_STAMP := $(DEMO_DIR)/.ready
CERTS_DIR ?= .run/certs

.PHONY: setup proto demo certs run test lint format bench replay gameday clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

# Generated stubs live in the shared package; tests fail when they are stale.
proto: $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Iinfermesh/proto=protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Demo feature views, synthetic data generator output and the trained `fraud` model repository.
demo: proto $(DEMO_STAMP)

$(DEMO_STAMP): $(INSTALLED) $(wildcard demo/*.py)
	$(PY) -m demo.setup --out $(DEMO_DIR)
	touch $@

# Development CA (ca.pem) and a certificate per service for TLS / mutual TLS (existing files are kept).
certs: $(INSTALLED)
	$(PY) -m demo.certs --out $(CERTS_DIR)

# TLS=1: every hop over TLS (mutual TLS inside) with the certificates of `make certs` (made when missing).
run: demo
	$(PY) -m demo.run --demo-dir $(DEMO_DIR) $(if $(filter 1,$(TLS)),--tls-dir $(CERTS_DIR))

test: demo
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

# Latency, throughput and fault figures of the local mesh (BENCHMARKS.md); e.g. BENCH_ARGS=--quick.
bench: demo
	$(PY) -m bench --demo-dir $(DEMO_DIR) $(BENCH_ARGS)

# The demo's labelled transactions, then their labels, through the gateway: online accuracy (M4) from real labels.
# REPLAY_ARGS e.g. --transactions 500, or --gateway HOST:PORT --api-key KEY for a running mesh that logs fraud.
replay: demo
	$(PY) -m bench.replay --demo-dir $(DEMO_DIR) $(REPLAY_ARGS)

# Each failure mode injected into a local mesh (shifted inputs, slow replica, Redis stall, stale features, overload,
# replica kill) and the metric that reveals it; about a minute and a half. GAMEDAY_ARGS=--quick: fewer requests.
gameday: demo
	$(PY) -m bench.gameday --demo-dir $(DEMO_DIR) $(GAMEDAY_ARGS)

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(INSTALLED)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf .run .pytest_cache .ruff_cache .mypy_cache
