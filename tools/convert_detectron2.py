"""Convert a detectron2 model-zoo Faster R-CNN checkpoint (.pkl) into a torchvision FasterRCNN checkpoint.

`python tools/convert_detectron2.py` runs mdistiller/cli/convert_detectron2.py (also a console script).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.cli.convert_detectron2 import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
