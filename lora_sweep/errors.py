"""The one error type a user sees as a single line: what was wrong and what is allowed."""


class UserError(Exception):
    """Bad input (config, data, model or network). The CLI prints it as one line and exits non-zero."""
