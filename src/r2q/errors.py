"""Errors meant for the user: one clear sentence, printed by the CLI without a traceback."""


class UserError(Exception):
    """A problem with the user's input (files, options, data). The CLI prints it and exits 2."""
