"""``python -m benchmarks.experiments``: see benchmarks/experiments/command.py."""

import sys

from benchmarks.experiments.command import main

sys.exit(main())
