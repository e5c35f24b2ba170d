"""Results analysis: result-log tables, published numbers, plots (used by the command-line tools only)."""
