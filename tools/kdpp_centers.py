"""Make KD++ / DKD++'s class centres: the teacher's mean pooled feature per class over the training set.

`python tools/kdpp_centers.py` runs mdistiller/cli/kdpp_centers.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.kdpp_centers import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
