"""The deliberate error types of bad input. ``run_cli`` prints these as one ``error: ...`` line
and exits with code 2; any other exception is a bug and keeps its traceback."""


class UsageError(ValueError):
    """A value the user gave (a flag, a file, a config entry) is not what was expected."""


class MissingInput(UsageError, FileNotFoundError):
    """Something the user pointed at does not exist where they said."""


class OutputConflict(UsageError, FileExistsError):
    """An output location already holds something this run must not overwrite."""
