"""Plots as PNG files (needs matplotlib: pip install -e .[plots]).

`python tools/plot.py` runs mdistiller/cli/plot.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.plot import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
