"""The one exception type a user sees: bad input, explained in one line."""


class RopeSearchError(ValueError):
    """Raised for bad input (configs, factor files, model paths, haystacks...).

    The CLI prints its message on one line and exits with code 2; library callers get a ValueError.
    """
