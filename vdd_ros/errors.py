"""Errors that describe bad input; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a config, a file, a message or a command-line argument."""


class ConfigError(UserError, ValueError):
    """A config file or value is invalid; the message names the field and the file."""
