# The two commands a user needs: `make demo` and `make test`. Each sets everything up on first use.
VENV  := .venv
STAMP := $(VENV)/.setup-done

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oodlab demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_metrics.py
	$(VENV)/bin/python bench/bench_scores.py
	$(VENV)/bin/python bench/bench_train.py
	$(VENV)/bin/python bench/bench_sweep.py

clean:
	rm -rf .oodlab
