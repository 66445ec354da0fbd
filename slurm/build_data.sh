#!/bin/bash
# Submit a sharded dataset build: TASKS array tasks, then the merge once all of them succeeded.
#
#   INPUT="/data/docvqa.jsonl /data/pdfs" OUTPUT_PREFIX=/data/mmprolong/docvqa \
#   TOKENIZER=/models/Qwen2.5-VL-7B-Instruct TASKS=32 slurm/build_data.sh [sbatch options] [-- build-data options]
#
# The variables are those at the top of build_data.sbatch; sbatch options (partition, account,
# time) go before `--`, extra build-data options (--task ocr-full, --shard-size ...) after it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TASKS=${TASKS:-16}
options=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
[ $# -eq 0 ] || shift
array=$(sbatch --parsable --array="0-$((TASKS - 1))" --export=ALL,STAGE=build "${options[@]}" "$here/build_data.sbatch" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --export=ALL,STAGE=merge --output=%x-%j.out \
        "${options[@]}" "$here/build_data.sbatch" "$@")
echo "build-data: array job ${array} (${TASKS} tasks), merge job ${merge%%;*}"
