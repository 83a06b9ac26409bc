"""The two exception types a user sees, each explained in one line by the CLI."""


class RopeSearchError(ValueError):
    """Raised for bad input (configs, factor files, model paths, haystacks...).

    The CLI prints its message on one line and exits with code 2; library callers get a ValueError.
    """


class EnvironmentFault(RuntimeError):
    """Not the input's fault (a study gone, a storage or cluster unreachable, a folder busy elsewhere, a
    full disk, a read-only destination): the CLI prints its message, which says how to go on, on one
    line and exits with code 1."""
