"""``python -m qcompile`` (e.g. ``torchrun --nproc_per_node 2 -m qcompile compile ...``)."""

import sys

from qcompile.cli import main

sys.exit(main())
