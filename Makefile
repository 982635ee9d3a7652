# Two entry points: `make demo` runs the product end to end, `make test` runs the test suite.
# Both create .venv and install the core and the model plugins with pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*)

.PHONY: demo test install clean

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/templated-llm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS:%=%/pyproject.toml) constraints.txt
	@# Spark (batch inference tests) needs a Java runtime: Debian's, when the machine has none.
	@command -v java >/dev/null || { echo "installing a Java runtime for Spark"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && \
	  $$SUDO apt-get install -y -q --no-install-recommends openjdk-17-jre-headless; }
	$(PYTHON) -m venv $(VENV)
	@# Builds run without isolation, on these pinned backends: hatchling for our packages,
	@# setuptools and wheel for pyspark, which ships only as an sdist.
	$(PIP) install -q -c constraints.txt hatchling editables setuptools wheel
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[test,bench]' $(PLUGINS:%=-e %)
	touch $(STAMP)

clean:
	rm -rf $(VENV) .cache mlflow.db mlruns
