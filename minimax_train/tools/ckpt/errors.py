"""The one error the checkpoint tools raise for bad input (the CLI prints it as one line)."""


class CkptToolError(ValueError):
    pass
