"""The one exception type Pollen shows to users.

A :class:`PollenError` carries a complete, one-paragraph message: what is wrong
and what to do about it. The command line prints it without a traceback and
exits with status 2; library callers can catch it like any other exception.
"""


class PollenError(Exception):
    """A problem the user can fix (bad option, missing data, unreachable server)."""
