"""User mistakes: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and what is allowed."""


def exit_on_user_error(fn: Callable) -> Callable:
    """Entry-point wrapper: a UserError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
