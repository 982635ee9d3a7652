# Two entry points: `make demo` runs the product end to end, `make test` runs the test suite.
# Both create .venv and install the core and the MPT plugin with pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/templated-llm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml plugins/mpt-instruct/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt hatchling editables
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[test]' -e plugins/mpt-instruct
	touch $(STAMP)

clean:
	rm -rf $(VENV) .cache mlflow.db mlruns
