"""Argument checks shared by every method: one place for "a number, not a bool, in range" and friends.

Every check raises ``ValueError`` with a message that names the argument in backticks, says what it is
and lists (or bounds) what is allowed, so a bad argument fails before training with a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def is_number(value: object, integer: bool = False) -> bool:
    """Whether ``value`` is an ``int`` (or, unless ``integer``, a ``float``), ``bool`` excluded."""
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


def check_number(
    value: object,
    argument: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    what: str = "",
) -> Any:
    """``value`` (an ``int`` when ``integer``, else a ``float``) if it is a number inside the interval, else raise.

    Args:
        value: The argument's value.
        argument: Its name, quoted in the message.
        low: Lower bound (``-inf``: none).
        high: Upper bound (``inf``: none).
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        integer: Require an ``int``.
        what: What the argument is, in a few words (shown in the message).

    Raises:
        ValueError: Naming ``argument``, what it is and the allowed interval.
    """
    inside = (
        is_number(value, integer)
        and not (isinstance(value, float) and math.isnan(value))
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not inside:
        kind = "an integer" if integer else "a number"
        if low == -math.inf and high == math.inf:
            where = ""
        elif integer and low == 1 and high == math.inf and not low_open:
            kind, where = "a positive integer", ""
        elif integer and high == math.inf and not low_open:
            where = f" >= {low:g}"
        else:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        label = f"`{argument}`" + (f" ({what})" if what else "")
        raise ValueError(f"{label} must be {kind}{where}; got {value!r}.")
    return int(value) if integer else float(value)


def check_positive_int(value: object, argument: str, what: str = "") -> int:
    """``value`` if it is an ``int >= 1`` (``bool`` excluded).

    Raises:
        ValueError: Otherwise, naming ``argument``.
    """
    return check_number(value, argument, 1, integer=True, what=what)


def check_fraction(value: object, argument: str, what: str = "", *, closed_high: bool = False) -> float:
    """``float(value)`` if it is in ``[0, 1)`` (``[0, 1]`` with ``closed_high``).

    Raises:
        ValueError: Otherwise, naming ``argument``.
    """
    return check_number(value, argument, 0.0, 1.0, high_open=not closed_high, what=what)


def check_choice(value: object, allowed: Iterable[object], argument: str, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is one of ``allowed`` (or None if ``optional``)."""
    allowed = tuple(allowed)
    if (optional and value is None) or value in allowed:
        return
    choices = ", ".join(repr(a) for a in allowed) + (" or None" if optional else "")
    raise ValueError(f"`{argument}` must be one of {choices}; got {value!r}.")


def check_sparsity(sparsity: object, argument: str = "sparsity") -> float:
    """Validate a sparsity (fraction of weights removed) in ``[0, 1)``.

    Raises:
        ValueError: If ``sparsity`` is not a number in ``[0, 1)``.
    """
    return check_number(sparsity, argument, 0.0, 1.0, high_open=True, what="the fraction of weights removed")


def check_min_density(min_density: object, sparsity: float) -> float:
    """Validate a per-layer minimum density against the overall density ``1 - sparsity``.

    Raises:
        ValueError: If ``min_density`` is outside ``[0, 1 - sparsity]``.
    """
    value = check_number(min_density, "min_density", 0.0, 1.0, what="a per-layer fraction kept")
    if value > 1.0 - sparsity + 1e-12:
        raise ValueError(
            f"`min_density`={min_density} exceeds the overall density 1 - `sparsity` = {1 - sparsity:g}: "
            "every layer cannot keep more than the whole network does."
        )
    return value


def check_point(value: object, argument: str) -> None:
    """Validate a training point: an optimizer step (``int >= 0``) or a fraction of training (``float`` in [0, 1]).

    Raises:
        ValueError: Otherwise, naming ``argument``.
    """
    if not is_number(value) or value != value or value < 0:  # (NaN != NaN)
        raise ValueError(
            f"`{argument}` is an optimizer step (int >= 0) or a fraction of training (float); got {value!r}."
        )
    if isinstance(value, float) and value > 1:
        raise ValueError(f"`{argument}` as a float is a fraction of the training steps in [0, 1]; got {value!r}.")


def check_gradual(sparsity: object, initial_sparsity: object, start: object, end: object) -> float:
    """Validate a gradual schedule from ``initial_sparsity`` to ``sparsity`` over ``[start, end]``; return ``s_i``.

    Raises:
        ValueError: On a sparsity outside ``[0, 1)``, ``initial_sparsity > sparsity`` or bad window points.
    """
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > check_sparsity(sparsity):
        raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity}).")
    check_point(start, "start")
    check_point(end, "end")
    return initial
