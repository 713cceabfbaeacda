"""Error types shared by several layers (each names the file and the problem, for the CLI to print)."""


class UserError(ValueError):
    """A failure the user can fix: its message names the file, field or flag and what to do.

    The CLI prints it as one line (`mobilellm COMMAND: error: ...`) and exits with status 2.
    """


class DataError(UserError):
    """Input data (a corpus, token shards, an eval task file) that is missing or cannot be read or used."""
