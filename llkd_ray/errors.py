"""Errors that are the user's to act on: the command line shows their message alone, without a traceback."""


class UserError(Exception):
    """Something about the input, the config or the environment that the message says how to fix."""
