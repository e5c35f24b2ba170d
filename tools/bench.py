"""Throughput of the training step: mdistiller's pipeline against ours and each speed switch, timed in one process.

`python tools/bench.py` runs mdistiller/cli/bench.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.bench import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
