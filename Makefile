# The two set-up commands of the README:
#   make quickstart   build the environment, train recipes/quickstart.toml, print its results from the index
#   make test         build the environment, run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint bench

$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/ci.txt -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/vlforge run recipes/quickstart.toml
	$(BIN)/vlforge query "SELECT r.run_id, e.evaluator, e.metric, round(e.value, 3) AS value \
	  FROM evals e JOIN runs r USING (run_id) \
	  WHERE r.recipe_name = 'quickstart' AND r.status = 'completed' \
	  AND e.step = (SELECT max(step) FROM evals WHERE run_id = r.run_id) \
	  ORDER BY r.start_time DESC, e.evaluator, e.metric LIMIT 12"

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
