"""The one error the checkpoint tools raise for bad input (the CLI prints it as one line)."""

from minimax_train.errors import MinimaxError


class CkptToolError(MinimaxError, ValueError):
    pass
