"""Caches of what the router derives from statement texts, where texts that differ only in
numbers share an entry. No I/O.

``pgbench -S -M simple`` sends a new text every query (a new aid); so do applications that
put constants in their SQL. What the router derives from a text (its routing verdict, its
statistics fingerprint) does not change with the value of a numeric constant, so a cache keyed
by ``cache_key`` answers such texts for the price of a ``bytes.translate``, where the regex
passes they would otherwise need cost several times more.

``cache_key``: every digit becomes 0, unless some digit is next to an identifier character
(t1, $1, 1e5, x'1f', 2abc: not constants, or not surely) or inside a double-quoted identifier
("col 1"): such a text is its own key. Bytes >= 0x80 count as identifier characters. Digits in
string literals and comments are zeroed too; neither routing nor fingerprints look at their
values.

Where the quoted identifiers of a text are is known only by lexing it, so a text with a double
quote gets a zeroed key only when a simple lexer (``_LEXEMES``, shared with ``shape_key``)
accounts for every quote in it: no backslash (E'' escapes), no dollar quoting, no nested
comment, where a lexer this simple could mistake a quoted name for a string or comment. ORMs
quote every name (``SELECT "auth_user"."id" ... WHERE "auth_user"."id" = 5``): without this,
each new constant would cost a parse.

``shape_key``: the text with its string and numeric constants replaced by ``?``, for texts that
differ in string constants too (``WHERE email = 'a@b.c'``, as drivers that inline parameters
send them), or whose digits rule the zeroed key out (``FROM t1 WHERE id = 5``). It lexes the
text the same careful way and gives up (None) where that lexer could go wrong. A ``TextCache``
made with ``shapes=True`` looks there third, after the exact text and the zeroed one.

A value that depends on a constant (routing: ``EXPLAIN (ANALYZE 0)``, ``SET
transaction_read_only = 1``) must be stored with ``put(..., exact=True)``: found by its own
text only.
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_IDENT = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)) + b"_$" + bytes(range(0x80, 0x100))
_CLASSES = bytes.maketrans(b"0123456789" + _IDENT, b"0" * 10 + b"a" * len(_IDENT))

V = TypeVar("V")


# What shape_key looks at: quoted names and comments (kept, and skipped so that what they hold
# is not taken for constants), constants (replaced), and what this lexer does not handle.
# The lookahead lets the engine skip, at C speed, the positions where no lexeme starts.
_IDENT_CHAR = rb"[A-Za-z0-9_$\x80-\xff]"
_LEXEMES = re.compile(
    rb"""(?=[-"'/.0-9\\$])(?:(?P<keep>"[^"]*+"|--[^\n\r]*+|/\*(?:[^*/]++|\*(?!/)|/(?!\*))*+\*/)"""
    rb"|(?P<constant>'[^'\\]*+'|(?<!" + _IDENT_CHAR + rb")(?<!\.)(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?!"
    + _IDENT_CHAR + rb"))"
    rb"""|(?P<other>['"\\]|\$(?![0-9])|/\*))"""
)


def shape_key(sql: bytes) -> bytes | None:
    """``sql`` with its constants replaced by ?, or None when it holds what the lexer does not
    take apart: a backslash, dollar quoting, a nested or unterminated comment, an unterminated
    quote (see the module docstring). Quoted names and comments are kept whole."""
    pieces = []
    pos = 0
    for match in _LEXEMES.finditer(sql):
        kind = match.lastgroup
        if kind == "constant":
            pieces.append(sql[pos : match.start()])
            pieces.append(b"?")
            pos = match.end()
        elif kind == "other":
            return None
    pieces.append(sql[pos:])
    return b"".join(pieces)


def _numbers_only(zeroed: bytes) -> bool:
    """Whether the digits of a text (given with its digits zeroed: adjacency is the same) can
    all be numeric constants, so that the zeroed text is a safe key."""
    classes = zeroed.translate(_CLASSES)
    # find(), not ``in``: bytes.__contains__ goes through the buffer protocol, twice as slow.
    if classes.find(b"a0") >= 0 or classes.find(b"0a") >= 0:
        return False
    if zeroed.find(b'"') < 0:
        return True
    # Quoted names: shape_key's lexer must take the text apart, and find no digit in a name.
    for match in _LEXEMES.finditer(zeroed):
        kind = match.lastgroup
        if kind == "other" or (kind == "keep" and zeroed[match.start()] == 0x22 and b"0" in match.group()):
            return False
    return True


def cache_key(sql: bytes) -> bytes:
    """Equal keys mean the texts differ at most in digits that lie outside identifiers."""
    zeroed = sql.translate(_ZERO_DIGITS)
    return zeroed if _numbers_only(zeroed) else sql


class TextCache(Generic[V]):
    """Values by ``cache_key`` of a text (and, with ``shapes``, by ``shape_key``), each of the
    dicts bounded to ``maxsize`` (the oldest entry goes first).

    Lookups skip computing the key: a text seen before is found as it is, and a new text by its
    zeroed form, which was judged a safe key (``_numbers_only``) once, when it was stored; then
    by its shape.
    """

    def __init__(self, maxsize: int, shapes: bool = False) -> None:
        self.maxsize = maxsize
        self._exact: dict[bytes, V] = {}  # texts that are their own key
        self._zeroed: dict[bytes, V] = {}  # zeroed texts that are safe keys
        self._shapes: dict[bytes, V] | None = {} if shapes else None

    def get(self, sql: bytes) -> V | None:
        value = self._exact.get(sql)
        if value is None:
            # A zeroed text is stored only when it is a safe key, so a hit here is one.
            zeroed = sql.translate(_ZERO_DIGITS)
            value = self._zeroed.get(zeroed)
            if value is None and self._shapes:
                shape = shape_key(sql)
                if shape is not None:
                    value = self._shapes.get(shape)
                    if value is not None and sql.find(b"'") < 0 and _numbers_only(zeroed):
                        # Texts like this one (other numbers, as many digits) are found by
                        # the cheaper key from now on. Not with a string in it: its zeroed key
                        # would serve that string only, and crowd out the others.
                        _store(self._zeroed, zeroed, value, self.maxsize)
        return value

    def put(self, sql: bytes, value: V, *, exact: bool = False) -> None:
        """Store ``value`` for ``sql`` and the texts that share its keys; with ``exact``, for
        ``sql`` alone (a value that depends on the constants)."""
        if exact:
            _store(self._exact, sql, value, self.maxsize)
            return
        zeroed = sql.translate(_ZERO_DIGITS)
        if _numbers_only(zeroed):
            _store(self._zeroed, zeroed, value, self.maxsize)
        else:
            _store(self._exact, sql, value, self.maxsize)
        if self._shapes is not None:
            shape = shape_key(sql)
            if shape is not None:
                _store(self._shapes, shape, value, self.maxsize)

    def __len__(self) -> int:
        """Texts and zeroed texts stored (shapes index the same values a second way)."""
        return len(self._exact) + len(self._zeroed)


def _store(entries: dict, key: bytes, value: object, maxsize: int) -> None:
    if key not in entries and len(entries) >= maxsize:
        del entries[next(iter(entries))]
    entries[key] = value
