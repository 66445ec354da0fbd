#!/usr/bin/env bash
# The one-shot device check (see benchmarks/gpu_check.py): installs the wheels carried in .whl/
# (megatron-core; the GPU image has torch and transformers), then runs the check and writes its
# JSON. On a GPU node:   benchmarks/gpu_check.sh --out gpu_check.json
# Reduced, on the CPU:   benchmarks/gpu_check.sh --cpu --out /tmp/gpu_check.json   (CI runs this)
# The exit status is the check's: non-zero when any part failed, `pytest -m gpu` included, which
# runs under a timeout (--pytest-timeout for the whole run, --pytest-test-timeout per test); every
# part writes its section of the JSON as it ends, so a failure or a kill keeps the others' figures.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# the carried wheels, only where megatron-core is missing (the GPU image; not a dev checkout)
if ! "$python" -c "import megatron.core" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/mmprolong-gpu-check-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
