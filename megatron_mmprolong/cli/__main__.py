"""`python -m megatron_mmprolong.cli VERB ...`, as torchrun starts the eval verbs on every rank."""

import sys

from megatron_mmprolong.cli import main

sys.exit(main())
