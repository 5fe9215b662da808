# The two set-up commands of the README:
#   make quickstart   build the environment, train recipes/quickstart.toml, print its results from the index
#   make test         build the environment, start the Slurm dev cluster, run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint bench slurm-dev

$(STAMP): pyproject.toml requirements/ci.txt requirements/peers-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/ci.txt -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/peers-nodeps.txt
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/vlforge run recipes/quickstart.toml
	$(BIN)/vlforge query "SELECT r.run_id, e.evaluator, e.metric, round(e.value, 3) AS value \
	  FROM evals e JOIN runs r USING (run_id) \
	  WHERE r.recipe_name = 'quickstart' AND r.status = 'completed' \
	  AND e.step = (SELECT max(step) FROM evals WHERE run_id = r.run_id) \
	  ORDER BY r.start_time DESC, e.evaluator, e.metric LIMIT 12"

test: $(STAMP) slurm-dev
	$(BIN)/pytest -q

# The one-node Slurm cluster tests/test_slurm.py runs on (slurm/dev/start.sh: installs, starts,
# waits; idempotent). It needs root or sudo; without, those tests skip (and fail under CI=true).
slurm-dev:
	@if [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then slurm/dev/start.sh; \
	else echo "make: no root or sudo: the Slurm dev cluster is not started, tests/test_slurm.py skips"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
