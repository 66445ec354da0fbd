# Two entry points: `make test` and `make demo`. Both create .venv when it is missing.
# `make test312` is CI's second leg (.ci/run runs both): Python 3.12 with megatron-core 0.19.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pin the CPU build that lies on the CI machines' disk; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two pytest-xdist workers (the Slurm tests keep to one: conftest groups them); PYTEST_WORKERS=
# runs in one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup

# Python 3.12: pyenv's (`pyenv versions`), else python3.12 on PATH. Its venv (~5 GB: PyPI's torch
# is the CUDA build, which runs on the CPU) lives outside the checkout so that every clone, CI's
# included, reuses it; the stamp names the pyproject.toml and constraints.txt it was built from.
PYTHON312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12) \
                         $(shell command -v python3.12 2>/dev/null))
VENV312 ?= $(or $(MMPROLONG_VENV312),$(HOME)/.cache/megatron-mmprolong/venv312)
PY312 := $(VENV312)/bin/python
DEPS312 := $(VENV312)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
# What differs between megatron-core lines, once each (the 3.11 leg runs everything): the CPU
# shims and their guard, the TE rules, the model, Megatron's groups, TP2 x CP2 with a checkpoint
# moved to PP2, DDP grad norms, vision-TP checkpoint replicas, conversion round trips and layouts,
# training (the recorded TP2 x CP2 losses; a converted Qwen3-VL checkpoint trained and resumed bit
# for bit), gpu_check --cpu.
TESTS312 ?= tests/test_cpu_shims.py tests/test_te_versions.py tests/test_model.py tests/test_runtime_groups.py \
            tests/test_parallel.py::test_tp2_cp2_and_a_checkpoint_moving_to_pp2 tests/test_grad_norm.py \
            tests/test_vision_tp_checkpoint.py::test_weights_round_trip_across_vision_tp \
            tests/test_convert.py::test_round_trip_is_bit_exact \
            tests/test_convert.py::test_tp2_pp2_checkpoint_verifies_at_other_layouts \
            tests/test_convert.py::test_qwen3vl_conversion_exports_and_verifies_at_other_layouts \
            tests/test_training.py::test_tp2cp2_losses_equal_the_recorded_reference \
            tests/test_training.py::test_qwen3vl_converted_checkpoint_trains_and_resumes_bit_for_bit \
            tests/test_gpu_check.py

.PHONY: install test test312 demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

$(DEPS312):
	@test -n "$(PYTHON312)" || { echo "make test312: no Python 3.12 found: pyenv versions lists none and" \
	    "python3.12 is not on PATH (pyenv install 3.12, or PYTHON312=/path/to/python3.12)" >&2; exit 1; }
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q "$(TORCH_SPEC)"
	$(PY312) -m pip install -q -c constraints.txt -e ".[test]"
	rm -f $(VENV312)/.installed-*
	touch $@

# The shared venv's editable install points at whichever checkout ran last: this one, without
# touching its dependencies (megatron-core stays what constraints.txt pinned).
test312: $(DEPS312)
	$(PY312) -m pip install -q --no-deps -e .
	$(PY312) -m pytest $(PYTEST_WORKERS) $(TESTS312) $(PYTEST_ARGS)

demo: install
	$(PY) -m megatron_mmprolong.demo

clean:
	rm -rf $(VENV) out .pytest_cache
