"""The one exception type for problems the user can fix (bad config, missing data or checkpoint), and the
did-you-mean hint its messages give for a mistyped name."""

from __future__ import annotations

import difflib


class MdistillerError(Exception):
    """A user-facing error: the command-line tools print its message on one line and exit non-zero."""


def closest(name: object, candidates, cutoff: float = 0.5) -> str | None:
    """The candidate closest to `name` by difflib's ratio, None when none reaches `cutoff`."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(name: object, candidates, cutoff: float = 0.5) -> str:
    """' (did you mean X?)' for the candidate closest to `name`, '' when none is close enough."""
    match = closest(name, candidates, cutoff)
    return f" (did you mean {match}?)" if match else ""
