"""Errors that describe a user's mistake; the CLI prints them as one line and exits non-zero."""


class InputError(ValueError):
    """Bad input from the user (missing file, wrong dimensionality, mismatched grids, ...).

    The message is a complete, single-line sentence meant for the user; the CLI prints it without a
    traceback and exits with status 2.
    """
