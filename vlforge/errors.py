"""Errors a user can act on: the CLI prints their message, without a traceback."""


class VlforgeError(Exception):
    """Base of errors the CLI reports as one message; ``exit_code`` is the process's exit status."""

    exit_code = 2


class UserError(VlforgeError):
    """Bad input that none of the more specific errors covers."""


class RunFailed(VlforgeError):
    """A run stopped as failed (e.g. a non-finite loss); its directory holds the reason."""

    exit_code = 1
