"""Paper-style tables from the result logs: mean ± std over seeds (top-1; box AP for detection runs), per method
and teacher → student pair.

`python tools/report.py` runs mdistiller/cli/report.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.report import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
