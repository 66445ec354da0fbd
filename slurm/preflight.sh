#!/bin/bash
# train.sbatch's pre-flight step: one process on the first node, in the ranks' container if any,
# before any rank starts.
#   preflight.sh MARKER SAVE WORLD_SIZE PYTHON [mmprolong train arguments]
# 1. SAVE must be the host's folder: MARKER, written there by the batch script, must be visible
#    (a SAVE not mounted into the container would be written inside it and lost at exit);
# 2. `mmprolong train --preflight-world-size` checks WORLD_SIZE ranks against the layout and the global batch
#    and refuses in one line (exit 2).
set -euo pipefail
marker=$1 save=$2 world=$3 python=$4
shift 4
if [ ! -e "$marker" ]; then
    echo "train.sbatch: error: SAVE $save is not the host's folder here (the container does not mount it:" \
         "add it to CONTAINER_MOUNTS or the apptainer binds)" >&2
    exit 2
fi
exec "$python" -m megatron_mmprolong.train --preflight-world-size "$world" "$@"
