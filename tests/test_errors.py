"""The error tree's typed fields: what a caller reads back from an error it caught."""

from __future__ import annotations

import pickle

from patinox.errors import NotFound, Overloaded, QuotaExceeded, RateLimited, RunFailed


def test_fields_passed_are_typed_attributes_and_survive_pickling() -> None:
    err = RateLimited(
        "slow down", tenant_id="t_1", policy="tenant", limit=60, reset_after_s=3, retry_after_s=3
    )
    back = pickle.loads(pickle.dumps(err))
    for e in (err, back):
        assert (e.tenant_id, e.policy, e.limit, e.reset_after_s, e.retry_after_s) == (
            "t_1",
            "tenant",
            60,
            3,
            3,
        )
        assert e.fields["policy"] == "tenant"


def test_fields_not_passed_read_as_their_default_not_as_another_errors() -> None:
    assert NotFound("no such agent").retry_after_s is None
    assert Overloaded("busy", retry_after_s=0.5).waited_s is None
    assert QuotaExceeded("spent").reset_at is None
    failed = RunFailed("model error", reason="model_error", input_tokens=12)
    assert (failed.reason, failed.input_tokens, failed.output_tokens, failed.model) == (
        "model_error",
        12,
        0,
        "unknown",
    )
    assert RunFailed("x").to_dict()["details"] == {}  # defaults are not sent as details
