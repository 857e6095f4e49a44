"""TextCache (router/sqlkey.py): what it finds is exactly what ``cache_key`` or ``shape_key``
says is the same text; its size is bounded. No I/O. (The keys' meaning, that texts with equal
keys get equal fingerprints and verdicts, is tested in test_query_stats.py and test_route.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.sqlkey import TextCache, cache_key, shape_key

_PIECES = ["SELECT ", "a", "t1", " FROM t", " = ", "1", "23", "$1", "'s 1'", '"c 1"', "1e5", ".5",
           ", ", "(", ")", ";", " /* 7 */ ", "\u00e91", "9", "0x1f", " -"]
_TEXTS = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map(lambda p: "".join(p).encode())


@given(st.lists(_TEXTS, min_size=1, max_size=20), _TEXTS)
def test_a_text_is_found_exactly_when_a_stored_text_has_its_key(stored: list[bytes], probe: bytes) -> None:
    cache: TextCache[bytes] = TextCache(maxsize=1000)
    for text in stored:
        cache.put(text, cache_key(text))
    expected = cache_key(probe) if any(cache_key(t) == cache_key(probe) for t in stored) else None
    assert cache.get(probe) == expected


def test_texts_that_differ_in_numbers_share_one_entry() -> None:
    cache: TextCache[str] = TextCache(maxsize=10)
    cache.put(b"SELECT v FROM t WHERE id = 17", "v")
    assert cache.get(b"SELECT v FROM t WHERE id = 42") == "v"
    assert cache.get(b"SELECT v FROM t WHERE id = 420") is None  # another length: another key
    assert cache.get(b"SELECT v FROM t2 WHERE id = 17") is None
    cache.put(b"SELECT v FROM t1", "t1")  # a digit in a name: the text is its own key
    assert cache.get(b"SELECT v FROM t1") == "t1"
    assert cache.get(b"SELECT v FROM t2") is None
    assert len(cache) == 2


def test_the_cache_is_bounded_oldest_first() -> None:
    cache: TextCache[int] = TextCache(maxsize=3)
    for i in range(5):
        cache.put(b"SELECT c%d FROM t" % i, i)  # own keys
        cache.put(b"SELECT 1" + b"0" * i, i)  # zeroed keys of five lengths
    assert len(cache) == 6
    assert cache.get(b"SELECT c1 FROM t") is None and cache.get(b"SELECT c4 FROM t") == 4
    assert cache.get(b"SELECT 7") is None and cache.get(b"SELECT 70000") == 4


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        ("SELECT * FROM t1 WHERE id = 5", "SELECT * FROM t1 WHERE id = ?"),
        ('SELECT "u"."id" FROM "u" WHERE "u"."email" = \'a@b.c\' LIMIT 21',
         'SELECT "u"."id" FROM "u" WHERE "u"."email" = ? LIMIT ?'),
        ("SELECT E'x', B'01', X'1f', N'n', date'2020-01-01', 1.5e3, .5, 1., -7",
         "SELECT E?, B?, X?, N?, date?, ?, ?, ?, -?"),
        ("SELECT 'it''s', '\"'", "SELECT ??, ?"),
        ("SELECT $1, a1, t.c1, 0x1f, 12abc, \u00e91", "SELECT $1, a1, t.c1, 0x1f, 12abc, \u00e91"),
        ("SELECT \"col 1\", \"it's\" FROM t /* 'x' 2 */ WHERE v = 3 -- it's 4\n",
         "SELECT \"col 1\", \"it's\" FROM t /* 'x' 2 */ WHERE v = ? -- it's 4\n"),
        ("SELECT 1 -- c\r, 'x'", "SELECT ? -- c\r, ?"),  # \r ends a -- comment
        # What the lexer does not take apart: no shape.
        ("SELECT E'\\'', 1", None),
        ("SELECT $$x$$", None),
        ("SELECT $q$x$q$", None),
        ("SELECT a$b", None),
        ("SELECT 1 /* a /* nested */ */", None),
        ("SELECT 1 /* unterminated", None),
        ("SELECT 'unterminated", None),
        ('SELECT "unterminated', None),
    ],
)
def test_shape_key(sql: str, shape: str | None) -> None:
    assert shape_key(sql.encode()) == (shape.encode() if shape is not None else None)


@given(st.lists(_TEXTS, min_size=1, max_size=20), _TEXTS)
def test_with_shapes_a_text_is_found_when_a_stored_text_has_one_of_its_keys(stored: list[bytes], probe: bytes) -> None:
    cache: TextCache[bytes] = TextCache(maxsize=1000, shapes=True)
    for text in stored:
        cache.put(text, text)
    found = cache.get(probe)
    shape = shape_key(probe)
    if found is None:
        assert all(cache_key(t) != cache_key(probe) and (shape is None or shape_key(t) != shape) for t in stored)
    else:
        assert cache_key(found) == cache_key(probe) or (shape is not None and shape_key(found) == shape)


def test_an_exact_value_is_found_by_its_own_text_only() -> None:
    cache: TextCache[str] = TextCache(maxsize=10, shapes=True)
    cache.put(b"SET transaction_read_only = 1", "read only", exact=True)
    assert cache.get(b"SET transaction_read_only = 1") == "read only"
    assert cache.get(b"SET transaction_read_only = 0") is None


def test_a_shape_hit_adds_a_zeroed_key_only_for_a_text_without_strings() -> None:
    cache: TextCache[str] = TextCache(maxsize=100, shapes=True)
    cache.put(b"SELECT v FROM t1 WHERE id = 5", "by id")  # t1: no zeroed key, a shape
    cache.put(b"SELECT v FROM t WHERE a = 5 AND b = 'x'", "by string")
    assert len(cache) == 2
    assert cache.get(b"SELECT v FROM t WHERE a = 50 AND b = 'y'") == "by string"
    assert cache.get(b"SELECT v FROM t WHERE a = 51 AND b = 'z'") == "by string"
    assert len(cache) == 2  # one zeroed entry per string value would crowd out the rest
    assert cache.get(b"SELECT v FROM t WHERE a = 50") is None
    cache.put(b"SELECT v FROM t WHERE a = 5", "by number")
    assert cache.get(b"SELECT v FROM t WHERE a = 50") == "by number"  # by shape, then...
    assert len(cache) == 4  # ...its zeroed key, for the next text with two digits
    assert cache.get(b"SELECT v FROM t WHERE a = 77") == "by number"
