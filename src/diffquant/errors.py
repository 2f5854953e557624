"""The one error type diffquant raises for bad input: its message names the problem and the fix."""


class DiffquantError(Exception):
    """A user-facing error; the CLI prints it as one line, without a traceback."""
