# moepaper: the two commands of the README.
#   make reproduce   run the paper pipeline on the embedded models, default and pooled-balance ablation (CPU)
#   make test        create .venv if missing, install, run the tests offline
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

.PHONY: test reproduce install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned in the same command so pip takes the CPU wheel, never a CUDA build
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
