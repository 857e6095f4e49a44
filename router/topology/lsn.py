"""WAL positions (LSNs) as integers, so they compare and subtract like the byte offsets they are.

PostgreSQL prints a pg_lsn as two hex halves, 'X/Y', meaning (X << 32) + Y (see the pg_lsn type
in the "Data Types" chapter of the PostgreSQL manual).
"""

from __future__ import annotations

import string

LSN_MAX = (1 << 64) - 1

# MAXALIGN'd sizes of a WAL page header (access/xlog_internal.h, 64-bit builds): the short one
# on every page, the long one on the first page of a segment.
SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40


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


def replay_target(insert_lsn: int, segment_offset: int | None, block_size: int | None) -> int:
    """Where a replica's replay must have reached to hold every record inserted before
    ``insert_lsn`` (pg_current_wal_insert_lsn() on the primary; ``segment_offset`` its offset
    in its WAL segment, ``block_size`` wal_block_size).

    When the last record ends exactly at a page end, the insert position points past the
    header of the next page (and of a new segment, after a WAL switch), where no record ends
    until the next one is written: a replica that has replayed everything stops at the page
    boundary. No record can end right after a page header (what a page holds of a record is
    at least one byte), so such a position means the boundary itself."""
    if segment_offset == LONG_PAGE_HEADER:
        return insert_lsn - LONG_PAGE_HEADER
    if block_size and insert_lsn % block_size == SHORT_PAGE_HEADER:
        return insert_lsn - SHORT_PAGE_HEADER
    return insert_lsn
