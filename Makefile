# Thin wrappers: each target is one line of intent. See README.rst.
# Debian's interpreter when it is 3.11+ with venv (the one the .deb uses, and one that every
# account can run: a root-run suite starts its stdio servers as nobody), else python3 on PATH.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := tests/npm/node_modules/.installed

.PHONY: run test lint bench deb clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

run: $(STAMP)
	$(BIN)/director serve

# Real MCP servers from npm that the tests run against (pinned in tests/npm/package-lock.json).
$(NPM_STAMP): tests/npm/package.json tests/npm/package-lock.json
	cd tests/npm && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The suite under coverage, the daemons and commands it starts included (setup.cfg, [coverage:*];
# tests/harness.py). It runs in one pytest worker per CPU (pytest-xdist, a test file to a
# worker: most of a test's time is a daemon starting, so two workers keep two cores busy).
# Every process, pytest's and its workers' included, measures itself through the .pth file
# coverage installs, started by COVERAGE_PROCESS_START. The data files go to a directory every
# account may write in (a root-run suite may run a command as nobody). The total is printed
# whatever the outcome; .ci/run refuses a drop below its floor. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: export COVERAGE_FILE := $(CURDIR)/.coverage-data/coverage
test: export COVERAGE_PROCESS_START := $(CURDIR)/setup.cfg
test: $(STAMP) $(NPM_STAMP) lint
	rm -rf .coverage-data && mkdir -m 1777 .coverage-data
	$(BIN)/python -m pytest --numprocesses=$(TEST_WORKERS) --dist=loadfile; status=$$?; \
	$(BIN)/coverage combine --quiet && echo "coverage: $$($(BIN)/coverage report \
	    --format=total)% of the statements of src/director (daemons and commands included)"; \
	exit $$status

# Dead code: what vulture finds unused is deleted; vulture_whitelist.py names what a framework
# uses (Klein routes, pytest fixtures and the mcp SDK's decorated handlers are skipped here).
VULTURE_FLAGS := --exclude '*/node_modules/*' --ignore-names 'isLeaf,noisy,displayTracebacks,autocommit' \
	--ignore-decorators '@*.route,@*.handle_errors,@*.tool,@*.prompt,@*.resource,@*.completion,@*.fixture,@*.async_yield_fixture,@*.ensureDeferred,@*.mark.*,@*.hookimpl'

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/vulture src tests $(wildcard bench) vulture_whitelist.py $(VULTURE_FLAGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/twisted/plugins/dropin.cache tests/npm/node_modules

deb:
	packaging/build-deb

.PHONY: deb-test
deb-test: $(STAMP)
	DIRECTOR_TEST_DEB=1 $(BIN)/pytest tests/test_packaging.py
