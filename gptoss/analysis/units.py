"""Numbers with a unit prefix, for the report's table and the plots' bar labels (one scale per kind)."""

from __future__ import annotations

# (suffix, divisor), largest first; the last entry is the unscaled unit, used below the smallest prefix.
COUNT = (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))
BYTES = ((" GiB", 2**30), (" MiB", 2**20), (" KiB", 2**10), (" B", 1))
FLOPS = ((" TFLOP", 1e12), (" GFLOP", 1e9), (" MFLOP", 1e6), (" KFLOP", 1e3), (" FLOP", 1))


def scaled(value: float, units: tuple[tuple[str, float], ...], spec: str, unscaled_spec: str | None = None) -> str:
    """`value` in the largest unit it reaches, formatted with `spec` (`unscaled_spec` below all prefixes)."""
    *prefixed, (unit, _) = units
    for suffix, div in prefixed:
        if abs(value) >= div:
            return f"{value / div:{spec}}{suffix}"
    return f"{value:{unscaled_spec or spec}}{unit}"
