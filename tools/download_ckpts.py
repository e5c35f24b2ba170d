"""Fetch and verify the published CIFAR-100 teachers (cifar_teachers.tar) into download_ckpts/.

`python tools/download_ckpts.py` runs mdistiller/cli/download_ckpts.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.download_ckpts import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
