# IDGBR for QGIS — every set-up step lives here, so a fresh Debian 12 machine needs only
# `make demo` and `make test`.
SHELL := /bin/bash
PY_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export QT_QPA_PLATFORM ?= offscreen
# Debian's qgis_process wrapper adds --noversioncheck, which QGIS 3.22 rejects: call the binary.
QGIS_PROCESS := $(shell command -v qgis_process.bin 2>/dev/null || echo /usr/bin/qgis_process.bin)

.PHONY: install demo test test-backend test-plugin lint typecheck bench package qgis-process train train-gpu \
        screenshot evaluate clean

install: $(STAMP)

$(STAMP): backend/pyproject.toml Makefile
	@if ! $(PY_SYS) -c "import qgis.core" 2>/dev/null || ! command -v xvfb-run >/dev/null \
	    || ! $(PY_SYS) -c "import ensurepip" 2>/dev/null; then \
	  echo ">> installing QGIS, PyQGIS, Xvfb and venv support from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    qgis python3-qgis qgis-providers python3-venv xvfb xauth; \
	fi
	# --system-site-packages: PyQGIS is a Debian package of the system Python, not on PyPI.
	test -x $(PY) || $(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q -e "backend[test,distributed]"
	touch $(STAMP)

demo: install
	$(PY) -m idgbr.demo --out out

test: install
	$(PY) -m pytest -q tests

test-backend: install
	$(PY) -m pytest -q tests/backend

test-plugin: install
	$(PY) -m pytest -q tests/plugin

# Trains the bundled models from scratch on the CPU: coarse segmenters (about 1 h), then the refiners of
# REFINERS (default: dubai5 roads2 buildings2) for HOURS (default 2.5) on 2 cores. The refiners' schedules
# span several such runs: `make train RESUME=1 REFINERS="dubai5 roads2"` continues them (from
# runs/*.state.pt, or from the shipped model files on another machine).
DATA ?= ../shared/datasets/dubai-aerial
ACCRA ?= ../shared/datasets/accra-buildings
RESUME ?= 0
HOURS ?= 2.5
REFINERS ?=
train: install
	PY=$(PY) RESUME=$(RESUME) HOURS=$(HOURS) REFINERS="$(REFINERS)" tools/train_bundled.sh $(DATA) $(ACCRA) 1

# The same recipe on a CUDA machine (bfloat16 autocast, larger batches); SCALE shortens the budgets.
train-gpu: install
	PY=$(PY) RESUME=$(RESUME) HOURS=$(HOURS) REFINERS="$(REFINERS)" IDGBR_DEVICE=cuda tools/train_bundled.sh $(DATA) $(ACCRA) 0.13

# Validation on data no model saw (Dubai tile 8, Accra val/): picks the sampler defaults, writes metrics into
# the model cards, and the tables and figures of docs/MODEL_CARD.md.
# A second coarse model of another architecture (a plain FCN), so the refiners are also validated on the maps
# of a model they were not trained with; trained once and kept in runs/. A fixed number of iterations, not
# minutes, so that every machine validates against the same FCN (9 min on one thread with bf16 units).
SECOND_MODEL := runs/fcn5_coarse.safetensors
$(SECOND_MODEL): | install
	$(PY) -m idgbr.train coarse --architecture fcn --data $(DATA) --threads 1 --batch 8 --iterations 600 \
	  --seed 5 -o $@

VALIDATE = $(PY) -m idgbr.validate --data $(DATA) --second-model $(SECOND_MODEL)
evaluate: install $(SECOND_MODEL)
	$(VALIDATE) --model resources/models/dubai5.safetensors --json docs/validation/dubai5.json \
	  --figure docs/images/refinement_dubai5.png
	$(VALIDATE) --model resources/models/roads2.safetensors --json docs/validation/roads2.json \
	  --figure docs/images/refinement_roads2.png
	$(VALIDATE) --model resources/models/buildings2.safetensors --accra $(ACCRA) \
	  --json docs/validation/buildings2.json --figure docs/images/refinement_buildings2.png
	$(PY) tools/model_card.py docs/validation/dubai5.json docs/validation/roads2.json \
	  docs/validation/buildings2.json --out docs/MODEL_CARD.md

lint: install
	$(VENV)/bin/ruff check backend idgbr_qgis tests tools

# Type check of the backend; the settings (libraries without types, modules not yet clean) are in mypy.ini.
typecheck: install
	$(VENV)/bin/mypy backend/idgbr

bench: install
	$(VENV)/bin/idgbr bench --report docs/BENCHMARKS.md

package: install
	$(PY) tools/package_plugin.py --out dist

# The real QGIS window under Xvfb with the dock, a drawn extent and the refined layer -> docs/images/dock.png
screenshot: install
	$(PY) tools/screenshot.py --out docs/images/dock.png

# Runs QGIS's qgis_process with this plugin loaded, e.g.
#   make qgis-process ARGS="run idgbr:refine -- INPUT=a.tif OUTPUT=b.tif"
# qgis_process loads only the Python plugins its profile enables: a throwaway profile enables this one
# (found through QGIS_PLUGINPATH), so the user's own QGIS profile is left alone. Its exit status is make's;
# nothing else is printed, so ARGS="--json run ..." gives clean JSON on stdout.
QGIS_PROCESS_PROFILE := $(CURDIR)/build/qgis-process-profile
qgis-process: install
	@mkdir -p "$(QGIS_PROCESS_PROFILE)/profiles/default/QGIS"
	@printf '[PythonPlugins]\nidgbr_qgis=true\n' > "$(QGIS_PROCESS_PROFILE)/profiles/default/QGIS/QGIS3.ini"
	@QGIS_CUSTOM_CONFIG_PATH="$(QGIS_PROCESS_PROFILE)" QGIS_PLUGINPATH="$(CURDIR)" \
	  IDGBR_PYTHON="$${IDGBR_PYTHON:-$(CURDIR)/$(PY)}" $(QGIS_PROCESS) $(ARGS)
