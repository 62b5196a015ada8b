# Every user-facing target runs `setup` first, so each works on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint wheelhouse bench clean

setup: $(STAMP)

# Re-runs only when the requirements change; `make setup` on an existing venv updates it in place.
$(STAMP): requirements-dev.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m kaggle_i2p.demo

wheelhouse: setup
	$(VENV)/bin/kaggle-i2p pack-wheels --out dist/wheelhouse

test: setup wheelhouse
	$(VENV)/bin/ruff check kaggle_i2p tests benchmarks tools
	$(PY) -m pytest -q

# Every benchmark at sizes that fit a 2-core machine (about 20 minutes); results go in docs/benchmarks.md.
bench: setup
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf dist build *.egg-info .pytest_cache .ruff_cache .cache
