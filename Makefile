# The Attention Book. Two commands on a fresh clone:
#   make book   -- set up, execute the notebooks with papermill, build the HTML book
#   make test   -- set up, run the full test suite (unit tests, notebooks, book build)
# Both are incremental: a notebook is executed again only when its source, its
# parameters, the attn package or the installed environment changed, N at a time
# (N = CPUs, or ATTN_BOOK_JOBS); `make clean` starts afresh.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
TORCH := $(shell grep -E '^torch==' .ci/constraints.txt)
STAMP := $(VENV)/.installed

.PHONY: book test env sync assets execute html unit clean

# The torch CPU wheel is installed first and pinned by .ci/constraints.txt for
# every later install, so that no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c .ci/constraints.txt -e '.[book,test,refs]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" > /dev/null
	touch $(STAMP)

env: $(STAMP)

sync: env
	$(PY) book/build.py sync

assets: env
	$(PY) book/build.py assets

execute: env
	$(PY) book/build.py execute

html: env
	$(PY) book/build.py html

book: env
	$(PY) book/build.py all

unit: env
	$(PY) -m pytest -m "not slow" -q

test: env
	$(PY) -m pytest -q

clean:
	rm -rf _build .pytest_cache
