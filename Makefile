# The verbs a newcomer and CI use. Everything runs from the project's own .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench bench-quick bench-hardening clean

# Reinstall only when the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/kbms migrate
	$(BIN)/kbms serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

test: lint
	$(BIN)/pytest

# The A/B benchmark against the reference implementation, per core (the headline), whole machine and on PostgreSQL
# (about 30 minutes; installs wrk if it can), then the reads at 1,000,000 conversations on SQLite and PostgreSQL
# (hours, up to 30 GB of disk at a time): `$(BIN)/python bench/bench.py --scale 0 --pg-scale 0` skips those.
bench: install
	$(BIN)/python bench/bench.py

bench-quick: install
	$(BIN)/python bench/bench.py --quick

# Slow clients and overload against a real kbms serve (about 4 minutes): bench/out/hardening.json.
bench-hardening: install
	$(BIN)/python bench/hardening.py all

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis .import_linter_cache
