"""Error types shared by several layers (each names the file and the problem, for the CLI to print)."""


class DataError(ValueError):
    """Input data (a corpus, token shards, an eval task file) that is missing or cannot be read or used."""
