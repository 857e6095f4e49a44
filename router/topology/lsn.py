"""WAL positions (LSNs) as integers, so they compare and subtract like the byte offsets they are.

PostgreSQL prints a pg_lsn as two hex halves, 'X/Y', meaning (X << 32) + Y (see the pg_lsn type
in the "Data Types" chapter of the PostgreSQL manual).
"""

from __future__ import annotations

import string

LSN_MAX = (1 << 64) - 1


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> 0x16B374D848. Raises ValueError on anything else."""
    high, sep, low = text.strip().partition("/")
    if not (_is_hex32(high) and _is_hex32(low)) or not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(lsn: int) -> str:
    """The inverse of parse_lsn, in PostgreSQL's own spelling (upper-case hex, no padding)."""
    if not 0 <= lsn <= LSN_MAX:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _is_hex32(part: str) -> bool:
    # int(x, 16) alone would also take signs, underscores and spaces.
    return 0 < len(part) <= 8 and all(c in string.hexdigits for c in part)
