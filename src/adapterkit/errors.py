"""One exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class AdapterkitError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
