# The same commands as scripts/*.sh (which need only bash, for machines without make).
#   make quickstart          set up .venv if needed, then run the quickstart
#   make test                set up .venv if needed, then run the test suite (README's command)
#   make test TESTS="-x tests/unit/test_config.py"     a part of the suite
#   VENV=.venv-ci make test  another environment (what .ci/run does)
VENV ?= .venv
STAMP := $(VENV)/.kdflow-setup-stamp
# the files that decide what is installed: setup re-runs when one is newer than the stamp
SETUP_INPUTS := pyproject.toml requirements-assets.txt plugins/kdflow-plugin-example/pyproject.toml

.PHONY: setup test quickstart

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS) scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

test: setup
	VENV=$(VENV) bash scripts/test.sh $(TESTS)

quickstart: setup
	VENV=$(VENV) bash scripts/quickstart.sh $(ARGS)
