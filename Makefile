# The two commands: `make demo` and `make test`. Both build .venv from requirements.lock first.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.synced
UV_VERSION := $(shell sed -n 's/^uv==//p' requirements.lock)
export PATH := $(abspath $(VENV))/bin:$(PATH)
# keep every tool from calling home
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test test-fast lint ui serve worker remote lock clean bench-accuracy bench-speed bench-scale

$(STAMP): requirements.lock
	@test -x $(VENV)/bin/python || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	@# bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on these machines) every
	@# stage process would otherwise compile torch, timm and MLflow from source at each import
	$(VENV)/bin/uv pip sync --quiet --compile-bytecode --python $(VENV)/bin/python requirements.lock
	@touch $@

demo: $(STAMP)  ## run the whole Noisy Student pipeline on the built-in digits demo
	dvc repro
	@echo; cat reports/comparison.md; echo
	@echo "Runs: make ui, then open $$(python -m noisy_student.tracking.runs)"

test: $(STAMP)  ## the whole test suite, end-to-end runs included
	python -m pytest -q -n auto --dist loadgroup --durations=15

test-fast: $(STAMP)  ## the inner loop: every test but the end-to-end runs (marked slow)
	python -m pytest -q -n auto --dist loadgroup -m "not slow"

lint: $(STAMP)
	ruff check . && ruff format --check .

ui: $(STAMP)  ## MLflow UI on 127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

serve: $(STAMP)  ## Prefect server on 127.0.0.1:4200 + the process serving `self-training/demo`
	python -m flows.serve --server

worker: $(STAMP)  ## deploy self-training/worker to the process work pool, then run a worker for it
	python -m flows.deploy
	prefect worker start --pool self-training

remote: $(STAMP)  ## the DVC remote every clone pushes to and pulls from: make remote URL=s3://bucket/path
	@test -n "$(URL)" || { echo "usage: make remote URL=<s3://bucket/path | /shared/folder>"; exit 2; }
	dvc remote add --default --force storage $(URL)

bench-accuracy: $(STAMP)  ## accuracy benchmark: teacher, rounds, upper bound, ablations (hours on a CPU)
	nice -n 10 python -m bench.accuracy

bench-speed: $(STAMP)  ## speed benchmark: fit and pseudo_label against the bare model (CUDA if present)
	python -m bench.speed

bench-scale: $(STAMP)  ## pseudo-labeling time and memory for pools of 1k, 10k, 100k images
	python -m bench.scale

lock: $(STAMP)  ## re-resolve requirements.lock from pyproject.toml
	$(VENV)/bin/uv pip compile --quiet pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:  ## remove pipeline outputs and the tracking store (not the venv)
	rm -rf data/prepared artifacts models pseudo_labels reports exports metrics.json mlflow.db mlruns checkpoints bench/work
