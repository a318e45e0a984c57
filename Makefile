# Two entry points that work on a fresh machine (Python 3.11, no GPU needed): `make demo` and `make test`.
# Both create .venv on first use and install the project into it; a CPU build of torch is installed
# first when no NVIDIA GPU is present (pip then keeps it: setup.cfg admits torch 2.13).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUNDLE := bundles/dagman_ct_pretraining
PYTEST_ARGS ?=

.PHONY: install demo lint test clean-demo

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "NVIDIA GPU found: torch comes from PyPI"; \
	else $(PY) -m pip install --quiet "torch==2.13.0"; fi
	$(PY) -m pip install --quiet -e ".[test,tracking,deploy]"
	touch $@

install: $(VENV)/.installed

# The small-budget DAGMaN recipe (configs/small_cpu.yaml) at demo scale (configs/demo_recipe.yaml): 133 steps on the
# 158 LIDC nodule crops shipped in the bundle, with the frozen-feature probe and S_ATT's attention metrics on the 24
# shipped labelled crops of other patients. Writes $(BUNDLE)/models/{checkpoint.pt,model.pt,model_card.json} and, in
# $(BUNDLE)/runs/, loss_curves.png (losses against ln K, collapse diagnostics, S_ATT against uniform), probe_auc.png
# (probe AUC and attention metrics per probe) and attention_overlay.png; a second run resumes from the checkpoint
# (make clean-demo starts over). Times: README.md.
demo: $(VENV)/.installed
	$(PY) -m monai.bundle run --config_file "['$(BUNDLE)/configs/train.yaml','$(BUNDLE)/configs/small_cpu.yaml','$(BUNDLE)/configs/probe.yaml','$(BUNDLE)/configs/demo_recipe.yaml']" \
		--bundle_root $(BUNDLE) --logging_file $(BUNDLE)/configs/logging.conf

# The layers and the lint rules (setup.cfg [importlinter], pyproject.toml [tool.ruff]): a core module that imports a
# task package fails here with the import named (module -> module, line); then every test.
lint: $(VENV)/.installed
	$(PY) -m ruff check --no-cache .
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf $(BUNDLE)/models/checkpoint.pt $(BUNDLE)/models/model.pt $(BUNDLE)/models/model_card.json $(BUNDLE)/runs
