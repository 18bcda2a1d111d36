# The two set-up commands of the README.
.PHONY: demo test install install-test

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

demo: install
	d2moe demo

# pytest exits 5 when it collects no test; that is a failure here too.
test: install-test
	python -m pytest -q
