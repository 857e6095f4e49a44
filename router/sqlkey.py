"""A cache key for statement texts that differ only in numbers. No I/O.

``pgbench -S -M simple`` sends a new text every query (a new aid); so do applications that
put constants in their SQL. What the router derives from a text (its routing verdict, its
statistics fingerprint) does not change with the value of a numeric constant, so caches keyed
by ``cache_key`` answer such texts for the price of a ``bytes.translate``, where the regex
passes they would otherwise need cost several times more.

Every digit becomes 0, unless some digit is next to an identifier character (t1, $1, 1e5,
x'1f', 2abc: not constants, or not surely) or the text has a double quote (a quoted identifier
may hold "col 1"): such a text is its own key. Bytes >= 0x80 count as identifier characters.
Digits in string literals and comments are zeroed too; neither routing nor fingerprints look
at their values.
"""

from __future__ import annotations

_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_IDENT = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)) + b"_$" + bytes(range(0x80, 0x100))
_CLASSES = bytes.maketrans(b"0123456789" + _IDENT, b"0" * 10 + b"a" * len(_IDENT))


def cache_key(sql: bytes) -> bytes:
    """Equal keys mean the texts differ at most in digits that lie outside identifiers."""
    classes = sql.translate(_CLASSES)
    # find(), not ``in``: bytes.__contains__ goes through the buffer protocol, twice as slow.
    if classes.find(b"a0") >= 0 or classes.find(b"0a") >= 0 or sql.find(b'"') >= 0:
        return sql
    return sql.translate(_ZERO_DIGITS)
