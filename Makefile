# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Build inputs: a change to any of them reinstalls (the FFI kernel is compiled during the install).
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard xla_ffi/*) $(wildcard fiddler_jax/kernels/_build*.py)

.PHONY: install demo test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

# Build requirements go in first so the editable install can build without isolation, against the same jax
# whose FFI headers the kernel is compiled with.
$(VENV)/.installed: $(VENV)/bin/activate $(INSTALL_INPUTS)
	$(PIP) install -q --upgrade pip setuptools wheel "cffi>=1.16" "jax>=0.10.2,<0.13"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job on the bundled tiny model (fiddler_jax/assets/tiny-mixtral): greedy continuation of a prompt.
demo: $(VENV)/.installed
	$(VENV)/bin/fiddler-jax generate max_new_tokens=48   # default prompt: "def fibonacci(n):"

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache build *.egg-info
