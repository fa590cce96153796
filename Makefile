# The README's two commands: `make demo` (run the product) and `make test` (the whole suite).
# Both create .venv and install the project into it first, every package at the version in constraints.txt
# (regenerate: .venv/bin/pip freeze --exclude-editable > constraints.txt); needs Python 3.11, Java 17, Maven.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/stream-app: pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python >= 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(BIN)/stream-app

demo: install
	$(BIN)/stream-app demo

lint: install
	$(BIN)/ruff check stream_app tests
	$(BIN)/ruff format --check stream_app tests
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
