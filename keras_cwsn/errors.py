"""User errors: one base class for every problem a user can fix, and one way to print it.

Every command line (`train.py`, `python -m keras_cwsn.predict`, `.evaluate`, `.report`, `.export`,
`.data.birdsnap`) catches `UserError`, prints `one_line(error)` on stderr and exits with status 2.
"""

import sys


class UserError(ValueError):
    """A problem the user can fix: a bad flag, config, file or data folder. One line, exit status 2."""


class UsageError(UserError):
    """A command line that can't be parsed (unknown flag, bad value)."""


def one_line(error, limit=1000):
    """The error's message on one line (whitespace collapsed, at most `limit` characters)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def print_error(error, prog=None):
    """`[prog: ]error: <one line>` on stderr."""
    lead = f"{prog}: " if prog else ""
    print(f"{lead}error: {one_line(error)}", file=sys.stderr, flush=True)


class RunError(UserError):
    """A run that can't start or go on (finished output folder, diverged training, unwritable outputs, ...)."""
