# Two entry points a newcomer needs (README): `make demo` and `make test`. Both set up first;
# set-up is idempotent and a fast no-op once done.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/byol-ray train

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_step.py --write
	$(PY) scripts/bench_augment.py

clean:
	rm -rf $(VENV) runs .pytest_cache
