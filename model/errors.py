"""The one user-facing error type: the CLI prints its message as one line and exits with its code."""


class AttnError(Exception):
    """A runtime error the user can act on (bad model, bad weights, prompt too long): exit 1."""

    exit_code = 1


class UsageError(AttnError):
    """A bad flag or value, an out-of-range layer/head/token: exit 2."""

    exit_code = 2
