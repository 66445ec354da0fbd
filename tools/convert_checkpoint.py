"""python tools/convert_checkpoint.py {hf-to-mcore,mcore-to-hf,verify} ...: same as `mmprolong convert`."""

import sys

from megatron_mmprolong.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
