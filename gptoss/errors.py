"""The one error family users see: bad input they can fix (a flag, a file, a config, a checkpoint).

Every module raises its own subclass (ConfigError, DataError, ...) with a message naming the file, key or
value and what was expected; launch scripts turn any of them into one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input the user can fix: reported as one line, never a traceback."""


class CheckpointError(UserError):
    """A checkpoint on disk that cannot be used as asked (`gptoss.checkpoint`): names the file, expected and found."""


class TrainError(UserError):
    """A flag or run layout the trainer refuses (`gptoss.train`); printed as one line."""


class ExportError(UserError):
    """An export that cannot be written or read as asked (`gptoss.export`); names the file or key and the fix."""


def exit_on_user_error(script: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a launch script's main: a UserError prints `script: error: message` and returns 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: object, **kwargs: object) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as e:
                print(f"{script}: error: {e}", file=sys.stderr)
                return EXIT_USER_ERROR

        return run

    return wrap
