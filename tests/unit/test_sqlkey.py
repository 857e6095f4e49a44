"""TextCache (router/sqlkey.py): what it finds is exactly what ``cache_key`` says is the same
text; its size is bounded. No I/O. (The keys' meaning, that texts with equal keys get equal
fingerprints and verdicts, is tested in test_query_stats.py and test_route.py.)"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router.sqlkey import TextCache, cache_key

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
