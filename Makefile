# Two entry points: `make demo` (set-up + the embedded default end to end) and `make test`.
# Both create .venv/ at the repo root on first use and reinstall only when pyproject.toml changes.
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# The CPU wheel. Override on a GPU machine, e.g. `make TORCH_SPEC='torch>=2.6,<2.15' demo`.
TORCH_SPEC ?= torch==2.13.0
OUT        ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
# lmms-eval (test extra) pulls torchvision, whose wheels on the index are CUDA builds: against
# the CPU torch one fails to load and breaks transformers, which imports it when present
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlmkit demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
