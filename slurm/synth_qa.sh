#!/bin/bash
# Submit synth-qa over a PDF pool: TASKS array tasks (each with its own vLLM server on its node,
# or all against ENDPOINT), then the merge once all of them succeeded.
#
#   INPUT=/data/pdfs OUT=/data/mmprolong/synth-qa MODEL=/models/Qwen2.5-VL-72B-Instruct TASKS=8 \
#       slurm/synth_qa.sh [sbatch options] [-- synth-qa options]
#
# The variables are those at the top of synth_qa.sbatch; sbatch options (partition, account,
# time) go before `--`, extra synth-qa options (--verify, --max-pixels ...) after it and reach
# both stages, which must agree on them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TASKS=${TASKS:-8}
options=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
[ $# -eq 0 ] || shift
array=$(sbatch --parsable --array="0-$((TASKS - 1))" --export=ALL,STAGE=part "${options[@]}" "$here/synth_qa.sbatch" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --export=ALL,STAGE=merge \
        --gres=none --cpus-per-task=8 --output=%x-%j.out "${options[@]}" "$here/synth_qa.sbatch" "$@")
echo "synth-qa: array job ${array} (${TASKS} tasks), merge job ${merge%%;*}"
