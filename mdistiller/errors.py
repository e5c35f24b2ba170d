"""The one exception type for problems the user can fix (bad config, missing data or checkpoint)."""


class MdistillerError(Exception):
    """A user-facing error: the command-line tools print its message on one line and exit non-zero."""
