"""python tools/check_parity.py --hf-dir DIR: same as `mmprolong check-parity`."""

import sys

from megatron_mmprolong.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-parity", *sys.argv[1:]]))
