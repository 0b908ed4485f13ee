"""Field checks shared by every settings object; each failure is a ConfigError naming the
owner, the field, the value and what is allowed."""

from __future__ import annotations

import math

from .errors import ConfigError


def check_int(owner: str, name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """An int (not a bool) >= minimum, or None when allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ConfigError(owner, name, value, f"an integer >= {minimum}{extra}")


def check_float(
    owner: str,
    name: str,
    value: object,
    minimum: float = 0.0,
    strict: bool = False,
    allow_none: bool = False,
) -> None:
    """A finite real number >= minimum (> minimum when strict), or None when allowed."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(number) and (number > minimum if strict else number >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        extra = " or None" if allow_none else ""
        raise ConfigError(owner, name, value, f"a finite number {bound}{extra}")


def check_bool(owner: str, name: str, value: object) -> None:
    """Exactly True or False."""
    if not isinstance(value, bool):
        raise ConfigError(owner, name, value, "True or False")
