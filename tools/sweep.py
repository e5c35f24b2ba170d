"""Run a sweep (configs x flags x seeds) on local GPUs or Slurm, then report its table.

`python tools/sweep.py` runs mdistiller/cli/sweep.py (also the console script mdistiller-sweep).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.sweep import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
