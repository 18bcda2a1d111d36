# The two set-up commands of the README.
.PHONY: demo test test-extended install install-test lint wheel-check

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

demo: install
	d2moe demo

lint:
	ruff check .

# A non-editable install from a built wheel, served from outside the repo.
wheel-check:
	bash scripts/wheel_check.sh

# What CI runs (.ci/run). pytest exits 5 when it collects no test: a failure here too.
# Two pytest-xdist workers: most of the suite's time is engines starting (one core each);
# tests/conftest.py keeps the tests that share an engine fixture in one worker.
PYTEST = python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=20
test: install-test lint wheel-check
	$(PYTEST)

# The long end-to-end tests the default suite leaves out (marker `extended`); CI runs them after `test`.
test-extended: install-test
	$(PYTEST) -m extended
