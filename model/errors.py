"""The one user-facing error type: the CLI prints its message as one line and exits with its code."""


class AttnError(Exception):
    """A runtime error the user can act on (bad model, bad weights, prompt too long): exit 1."""

    exit_code = 1


class UsageError(AttnError):
    """A bad flag or value, an out-of-range layer/head/token: exit 2."""

    exit_code = 2


def check_finite(what: str, *tensors) -> None:
    """AttnError where `tensors` (torch tensors, or None) hold NaN or +inf: numbers a sound model in a wide enough dtype
    never gives (-inf stands for a masked score)."""
    for t in tensors:
        if t is not None and bool(t.isnan().any() or t.isposinf().any()):
            raise AttnError(f"{what} is NaN/inf: broken weights, or an overflow in this dtype (try --dtype float32)")
