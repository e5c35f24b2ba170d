"""`python -m mdistiller.cli.bench`: tools/bench.py."""

from . import entry_point

entry_point()
