"""Server processes run with the start-up heap frozen and the server collector thresholds."""

from __future__ import annotations

import gc

import pytest

from patinox._process import SERVER_GC_THRESHOLDS, server_gc


def test_server_gc_freezes_sets_thresholds_and_restores_them() -> None:
    before = gc.get_threshold()
    assert before != SERVER_GC_THRESHOLDS
    with pytest.raises(RuntimeError), server_gc():
        assert gc.get_threshold() == SERVER_GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # the heap built so far is out of the collector's way
        raise RuntimeError("the server failed")
    assert gc.get_threshold() == before  # restored even when the server raised
    assert gc.get_freeze_count() == 0
