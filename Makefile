# Two commands do all set-up: `make demo` (whole pipeline on the synthetic phantom) and
# `make test` (ruff + pytest). Both create .venv with the pinned requirements when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA := input/phantom
DEMO_WORK := work/demo

.PHONY: venv test lint demo bench bench-parse bench-cache bench-metric bench-loader bench-quality bench-gpu clean-demo kaggle-dataset

venv: $(STAMP)

# Idempotent: a second run installs nothing (the stamp is newer than requirements.txt).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests kernels bench

test: lint
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup

demo: $(STAMP)
	PY=$(PY) bash src/run_pipeline.sh demo

bench: bench-parse bench-cache bench-metric bench-loader

bench-parse: $(STAMP)
	$(PY) bench/bench_parse.py

bench-cache: $(STAMP)
	$(PY) bench/bench_cache.py

bench-metric: $(STAMP)
	$(PY) bench/bench_metric.py

bench-loader: $(STAMP)
	$(PY) bench/bench_loader.py

# Quality benchmark (not part of `make bench`: ~40 CPU minutes). Extra arguments: BQ_ARGS="--variants gru_only".
bench-quality: $(STAMP)
	$(PY) bench/bench_quality.py $(BQ_ARGS)

# GPU figures (CUDA only; on a CPU-only machine it says so and exits 0). Not part of `make bench`.
bench-gpu: $(STAMP)
	$(PY) bench/bench_gpu.py

kaggle-dataset: $(STAMP)
	$(PY) kernels/make_kaggle_dataset.py

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_WORK) oof/seq_demo_* oof/ens_demo oof/demo submissions/demo_submission.csv reports/ens_demo
