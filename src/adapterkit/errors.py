"""One exception type for user mistakes (the CLI prints it as a single line and exits 2), and one
warning type for what the user should know but need not stop for."""

from __future__ import annotations

import warnings


class AdapterkitError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class AdapterkitWarning(UserWarning):
    """Something the user should know (data cut by the cutoff, a damaged checkpoint skipped, --force)."""


def warn(message: str) -> None:
    warnings.warn(message, AdapterkitWarning, stacklevel=2)
