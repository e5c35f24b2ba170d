"""Evaluate a checkpoint on a test set: top-1 and top-5.

`python tools/eval.py` runs mdistiller/cli/eval.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.eval import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
