"""Byte sizes as options take them ("1.5GiB", "200 MB", "4096") and as messages print them ("1.50 GiB")."""

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, what: str, allow_zero: bool = False) -> int:
    """Bytes in ``value``: an integer, or a number with a unit ("1.5GiB", "200 MB", "4096"; ``GB``
    is decimal, ``GiB`` binary). Errors name ``what``; zero is refused unless ``allow_zero``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be bytes as an integer or a string like '1.5GiB', got {value!r}")
    if isinstance(value, int):
        nbytes = value
    else:
        match = _SIZE.match(value)
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            raise ValueError(
                f"{what} {value!r} is not a memory size; write e.g. '1.5GiB', '200MB' or a number of bytes "
                f"(units: {', '.join(u for u in _UNITS if u)})"
            )
        nbytes = int(float(match.group(1)) * unit)
    if nbytes < 0 or (nbytes == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return nbytes


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1 ("1.50 GiB")."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"
