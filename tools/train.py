"""Train a teacher (DISTILLER.TYPE NONE) or distil a student, as a config describes.

`python tools/train.py` runs mdistiller/cli/train.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.train import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
