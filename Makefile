# The verbs a newcomer and CI use. Everything runs from the project's own .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser run test lint format bench bench-quick bench-hardening bench-console clean

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

# The browser tests (tests/browser) drive Debian's Chromium through Playwright: installed here when missing (as root),
# never downloaded by `playwright install` (KBMS_CHROMIUM names another). Without it those tests are skipped, and the
# run says so.
KBMS_CHROMIUM ?= /usr/bin/chromium
export KBMS_CHROMIUM
browser:
	@if [ -x "$(KBMS_CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }; \
	else \
		echo "No Chromium at $(KBMS_CHROMIUM): the browser tests will be skipped (install it: sudo apt-get install chromium)"; \
	fi

test: lint browser
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

# The console's pages against a million stored conversations (about an hour to build the database the first time):
# bench/out/console.json.
bench-console: install
	$(BIN)/python bench/console.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis .import_linter_cache
