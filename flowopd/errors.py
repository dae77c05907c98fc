"""User-facing errors: the CLI prints their message on stderr and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config): the message says what is wrong."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated or from another model."""
