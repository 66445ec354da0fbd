"""python tools/model_info.py (--preset 7b | --hf-dir DIR): same as `mmprolong model-info`."""

import sys

from megatron_mmprolong.cli import main

if __name__ == "__main__":
    sys.exit(main(["model-info", *sys.argv[1:]]))
