from __future__ import annotations

import pytest

from patinox.errors import InvalidRequest
from patinox.tenancy import PLANS, effective_limits, looks_like_id, new_id


def test_plans_differ() -> None:
    assert {"free", "pro", "enterprise"} <= set(PLANS)
    rpm = [PLANS[p].limits.requests_per_minute for p in ("free", "pro", "enterprise")]
    assert rpm == sorted(rpm) and len(set(rpm)) == 3


def test_overrides_apply() -> None:
    lim = effective_limits("free", {"requests_per_minute": 7})
    assert lim.requests_per_minute == 7
    assert lim.max_concurrent_runs == PLANS["free"].limits.max_concurrent_runs


def test_unknown_plan_and_bad_override() -> None:
    with pytest.raises(InvalidRequest):
        effective_limits("platinum", None)
    with pytest.raises(ValueError):
        effective_limits("free", {"requests_per_minute": 0})
    with pytest.raises(ValueError):
        effective_limits("free", {"bogus": 1})


def test_ids_unique_and_shaped() -> None:
    ids = {new_id("tn") for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(looks_like_id(i) for i in ids)


def test_an_id_is_matched_whole() -> None:
    """``re.match`` with ``$`` took ``"tn_...\n"`` for an id; ids name schemas and files."""
    tid = new_id("tn")
    for bad in (tid + "\n", "\n" + tid, tid + " ", tid[:-1], tid + "0", tid.upper()):
        assert not looks_like_id(bad), repr(bad)


def test_ids_sort_by_creation_time_as_text() -> None:
    import time

    ids = []
    for _ in range(5):
        ids.append(new_id("run"))
        time.sleep(0.002)
    assert ids == sorted(ids)


def test_id_digits_are_the_base32_digits_of_the_number() -> None:
    """The fast encoding gives the same digits as repeated division by 32, for the
    extremes and for random numbers of every size up to 2**128."""
    import random

    from patinox.tenancy._ids import _ALPHABET, _base32_26

    def by_division(value: int) -> str:
        digits = []
        for _ in range(26):
            value, d = divmod(value, 32)
            digits.append(_ALPHABET[d])
        return "".join(reversed(digits))

    rng = random.Random(7)
    values = [0, 1, 31, 32, 2**128 - 1, 2**80, *(rng.getrandbits(rng.randint(1, 128)) for _ in range(2000))]
    for v in values:
        assert _base32_26(v) == by_division(v)
