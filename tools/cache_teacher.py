"""Build (or --verify) the teacher-output cache of a config: the teacher's logits on every CIFAR training view.

`python tools/cache_teacher.py` runs mdistiller/cli/cache_teacher.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.cache_teacher import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
