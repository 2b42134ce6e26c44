"""The project's user-facing errors and the one place every command line turns them into a message.

A MinimaxError says what is wrong and how to fix it; CLIs print it as `<prog>: error: <message>`
(no traceback) and exit with its exit_code (2; 3 for a run stopped by non-finite steps). Anything
else is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


class MinimaxError(Exception):
    """A problem the user can fix (bad config, data, checkpoint, missing extra); the message says how."""

    exit_code = 2


class CheckpointError(MinimaxError, ValueError):
    """A checkpoint (ours or a transformers one) that cannot be read, written or used."""


class MissingExtraError(MinimaxError, ImportError):
    """An optional dependency is not installed."""


# our own "no such file" / "already exists" checks raise the builtin types: they are user errors too
USER_ERRORS = (MinimaxError, FileNotFoundError, FileExistsError)


def import_extra(module: str, extra: str, feature: str):
    """Import an optional dependency, or say which extra of pyproject.toml installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f'{feature} needs {module.split(".")[0]}, which is not installed: pip install -e ".[{extra}]" ({e})'
        ) from None


def report(prog: str, e: BaseException) -> int:
    """Print a user error as one line on stderr; its exit code."""
    msg = " ".join(str(e).split("\n"))
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return getattr(e, "exit_code", 2)


def run_cli(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a command's body; a user error becomes `prog: error: ...` and its exit code."""
    try:
        return fn() or 0
    except USER_ERRORS as e:
        return report(prog, e)
