"""``python -m lightning_sketch.cli``: the ``lightning-sketch`` console command."""

import sys

from lightning_sketch.cli import main

sys.exit(main())
