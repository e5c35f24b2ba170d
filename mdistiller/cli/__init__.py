"""The command-line tools (tools/*.py and the mdistiller-* console scripts are thin entry points into these modules).

What every tool shares: user errors become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import MdistillerError


def run_cli(main: Callable[[], object]) -> None:
    """Call main(); an MdistillerError prints `error: <message>` and exits 2, Ctrl-C exits 130."""
    try:
        main()
    except MdistillerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; a training run continues from its last checkpoint with --resume", file=sys.stderr)
        sys.exit(130)
