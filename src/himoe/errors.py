"""The one error type a user should ever see: the CLI prints it on one line, exit code 2."""


class UserError(Exception):
    """Bad input. The message names the problem and the fix."""
