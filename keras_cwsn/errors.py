"""User errors: one base class for every problem a user can fix, and one way to print it.

Every command line (`train.py`, `python -m keras_cwsn.predict`, `.evaluate`, `.report`, `.export`,
`.data.birdsnap`) catches `UserError`, prints `one_line(error)` on stderr and exits with status 2.
"""

import difflib
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


def did_you_mean(word, choices):
    """The choice a user most likely meant by `word`, or None: its initials (`lr` -> `learning_rate`), the one
    choice it starts (`mom` -> `momentum`), a close spelling (`batch_sise`), or the one choice holding its
    letters in order (`wdecay` -> `weight_decay`)."""
    word, choices = str(word).lower(), [str(c) for c in choices]
    for choice in choices:
        if "_" in choice and "".join(part[:1] for part in choice.split("_")) == word:
            return choice
    started = [c for c in choices if len(word) >= 2 and c.lower().startswith(word)]
    if len(started) == 1:
        return started[0]
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return close[0]
    holding = [c for c in choices if len(word) >= 2 and _in_order(word, c.lower())]
    return holding[0] if len(holding) == 1 else None


def _in_order(letters, text):
    rest = iter(text)
    return all(letter in rest for letter in letters)
