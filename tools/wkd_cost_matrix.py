"""Make WKD-L's class cost matrix: 1 - linear CKA between the teacher's per-class features on the training set.

`python tools/wkd_cost_matrix.py` runs mdistiller/cli/wkd_cost_matrix.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.wkd_cost_matrix import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
