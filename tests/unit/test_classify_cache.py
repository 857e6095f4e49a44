"""ClassifierCache: same answers as classify(), LRU order, bounds, keyed by catalog."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.routing.classify import ClassifierCache, classify
from router.routing.functions import FunctionCatalog
from router.routing.verdict import Reason, Target

CATALOG = FunctionCatalog.builtin()


def test_hit_returns_the_same_classification():
    cache = ClassifierCache()
    first = cache.classify("SELECT lower('A')", CATALOG)
    second = cache.classify("SELECT lower('A')", CATALOG)
    assert second is first
    assert first == classify("SELECT lower('A')", CATALOG)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_evicts_least_recently_used_beyond_maxsize():
    cache = ClassifierCache(maxsize=3)
    for sql in ("SELECT 1", "SELECT 2", "SELECT 3"):
        cache.classify(sql, CATALOG)
    cache.classify("SELECT 1", CATALOG)  # now the most recently used
    cache.classify("SELECT 4", CATALOG)  # evicts SELECT 2
    assert len(cache) == 3
    assert ("SELECT 2", CATALOG) not in cache
    assert all((sql, CATALOG) in cache for sql in ("SELECT 1", "SELECT 3", "SELECT 4"))


def test_keyed_by_catalog_identity():
    cache = ClassifierCache()
    empty = FunctionCatalog({})
    assert cache.classify("SELECT lower('a')", CATALOG).verdict.reason is Reason.READ
    assert cache.classify("SELECT lower('a')", empty).verdict.reason is Reason.UNKNOWN_FUNCTION
    reloaded = FunctionCatalog.builtin()  # equal content, new object: a new key
    assert cache.classify("SELECT lower('a')", reloaded).verdict.reason is Reason.READ
    assert (cache.misses, len(cache)) == (3, 3)


def test_long_texts_are_classified_but_not_cached():
    cache = ClassifierCache(max_sql_length=20)
    long_sql = "SELECT 1 AS a_long_column_name"
    assert cache.classify(long_sql, CATALOG).verdict.target is Target.REPLICA
    assert len(cache) == 0
    cache.classify(long_sql, CATALOG)
    assert (cache.hits, cache.misses) == (0, 2)


def test_total_text_budget_evicts():
    cache = ClassifierCache(maxsize=100, max_total_length=30)
    for i in range(10):
        cache.classify(f"SELECT {i}", CATALOG)  # 8 characters each
    assert len(cache) == 3
    assert ("SELECT 9", CATALOG) in cache and ("SELECT 6", CATALOG) not in cache


def test_clear():
    cache = ClassifierCache()
    cache.classify("SELECT 1", CATALOG)
    cache.clear()
    assert len(cache) == 0


def test_maxsize_must_be_positive():
    with pytest.raises(ValueError):
        ClassifierCache(maxsize=0)


POOL = [
    "SELECT 1",
    "SELECT nextval('s')",
    "INSERT INTO t VALUES (1)",
    "BEGIN READ ONLY",
    "/* pgrouter: primary */ SELECT 1",
    "garbage",
    "",
    "SET x = 1; SELECT 2",
    "SELECT my_function()",
    "COPY t FROM STDIN",
]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(POOL), max_size=60), st.integers(min_value=1, max_value=5))
def test_cache_agrees_with_classify_and_stays_bounded(sequence: list[str], maxsize: int):
    cache = ClassifierCache(maxsize=maxsize)
    for sql in sequence:
        assert cache.classify(sql, CATALOG) == classify(sql, CATALOG)
        assert len(cache) <= maxsize
    assert cache.hits + cache.misses == len(sequence)
