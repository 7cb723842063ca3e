# Everyday commands. Each target creates .venv and builds the extension as needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# per venv: each Python version builds its own extension (.ci/run tests two)
EXT_STAMP := $(VENV)/.ext-$(if $(DEBUG),debug,release)
# what `make` installs besides shmipc (.ci/run's second Python takes only test)
EXTRAS ?= test,bench,ray
SOURCES := shmipc/_ring.pyx shmipc/_ring.pxd shmipc/_codec.pxi shmipc/_arenas.pxi shmipc/_posix.pxd shmipc/_shm.pxd shmipc/_shm.h setup.py
PYTEST_ARGS ?=

.PHONY: build test bench bench-quick bench-busy readme-bench debug soak clean dist

$(PY):
	$(PYTHON) -m venv $(VENV)

# quiet: a user needs to see errors, not the build backend's notices
$(STAMP): pyproject.toml | $(PY)
	@echo "installing shmipc and its extras [$(EXTRAS)] into $(VENV) (pip -q)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q --upgrade "Cython>=3.0" "setuptools>=77"
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

$(EXT_STAMP): $(STAMP) $(SOURCES)
	@rm -f $(VENV)/.ext-*
	@# build aside, then rename over the old extension: running processes keep
	@# the file they mapped, and a failed build leaves the old one in place
	@echo "building the extension ($(if $(DEBUG),debug,release))"
	@SHMIPC_DEBUG=$(if $(DEBUG),1,0) $(PY) setup.py -q build_ext --force --build-lib build/lib
	@for so in build/lib/shmipc/_ring.*.so; do cp "$$so" "shmipc/.$$(basename $$so).tmp" && mv -f "shmipc/.$$(basename $$so).tmp" "shmipc/$$(basename $$so)"; done
	@mkdir -p build && touch $@

build: $(EXT_STAMP)

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# the default comparison, and its chart (the path is printed at the end)
bench: build
	$(PY) -m shmipc bench --plot $(CURDIR)/build/bench.png

bench-quick: build
	$(PY) -m shmipc bench --quick

# the same comparison on a busy machine: one CPU-bound loop per usable CPU beside every measurement
bench-busy: build
	$(PY) -m shmipc bench --busy $$($(PY) -c "import os; print(len(os.sched_getaffinity(0)))")

# the README's performance section and docs/bench.*, rewritten from one fresh run (~2 min)
readme-bench: build
	$(PY) -m shmipc bench --repeat 5 --json docs/bench.json --plot docs/bench.png --markdown docs/bench.md --readme README.md

# a build with C assertions and no optimisation, then the tests
debug:
	$(MAKE) DEBUG=1 test

# the kill-fuzz tests, SOAK times longer than CI can afford
SOAK ?= 10
soak: build
	SHMIPC_SOAK=$(SOAK) $(PY) -m pytest -s -p no:cacheprovider tests/test_crash.py tests/test_pool_crash.py $(PYTEST_ARGS)

# a wheel and an sdist in dist/ (the `build` package from PyPI, in its own isolated environment)
dist: | $(PY)
	@$(PY) -m pip install -q build
	$(PY) -m build
	@ls -l dist

clean:
	rm -rf build dist *.egg-info shmipc/*.so shmipc/_ring.c .pytest_cache .benchmarks $(VENV)/.ext-*

# CPython's own multiprocessing and concurrent.futures tests, run against the
# standard library and shmipc (tests/cpython/run.py; the table goes to
# build/cpython-tests.md). Builds without test.test_concurrent_futures (pyenv's
# and Debian's 3.11/3.12) take it from Debian's libpython3.X-testsuite,
# installed here where apt-get works; elsewhere that suite is skipped, saying so.
.PHONY: cpython-tests
CPYTHON_TESTS_ARGS ?=
cpython-tests: build
	@$(PY) -c 'import test.test_concurrent_futures' 2>/dev/null \
	  || ls /usr/lib/python$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')/test/test_concurrent_futures* >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq libpython$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-testsuite >/dev/null; } \
	  || echo "note: no test.test_concurrent_futures for this interpreter (and libpython3.X-testsuite could not be installed): that suite will be skipped"
	$(PY) tests/cpython/run.py --out build/cpython-tests $(CPYTHON_TESTS_ARGS)

# the README's table of CPython's tests, rewritten from one fresh run of all
# three start methods and all implementations (about 25 minutes on 2 cores)
.PHONY: readme-cpython-tests
readme-cpython-tests:
	$(MAKE) cpython-tests CPYTHON_TESTS_ARGS="--readme README.md $(CPYTHON_TESTS_ARGS)"

# the README's joblib figures (shmipc against loky and multiprocessing), from one fresh run
.PHONY: readme-joblib
readme-joblib: build
	$(PY) benchmarks/bench_joblib.py --repeat 3 --readme README.md
