"""``UTCDateTime`` on SQLite binds in one step (``isoformat``); the text it stores must be
exactly what the two-step path (``process_bind_param``, then SQLAlchemy's ``DATETIME``
format) stores, or ordering and equality against existing rows would break. Real SQLite."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select, text
from sqlalchemy.dialects import sqlite

from patinox.storage._schema import UTCDateTime


def _two_step(value: datetime | None) -> str | None:
    """What SQLAlchemy's TypeDecorator composition binds: process_bind_param, then
    DATETIME's own processor."""
    dialect = sqlite.dialect()
    step = UTCDateTime().process_bind_param(value, dialect)
    processor = sqlite.DATETIME().bind_processor(dialect)
    assert processor is not None
    return processor(step)  # type: ignore[no-any-return]


def _values() -> list[datetime]:
    rng = random.Random(7)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-14))]
    fixed = [
        datetime(2026, 12, 1, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 12, 1, 0, 0, 0, 0, tzinfo=UTC),  # no microseconds: still six digits
        datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=UTC),  # year below 1000: four digits
        datetime(2024, 2, 29, 12, 0, tzinfo=timezone(timedelta(hours=-3))),
    ]
    seconds = [rng.uniform(0, 250 * 365 * 86400) for _ in range(500)]
    spread = [datetime(1900, 1, 1, tzinfo=UTC) + timedelta(seconds=x) for x in seconds]
    return fixed + [v.astimezone(rng.choice(zones)) for v in spread]


def test_one_step_binds_what_two_steps_bind() -> None:
    processor = UTCDateTime().bind_processor(sqlite.dialect())
    assert processor is not None
    for value in _values():
        assert processor(value) == _two_step(value), value
    assert processor(None) is None


def test_naive_datetime_is_refused_as_before() -> None:
    processor = UTCDateTime().bind_processor(sqlite.dialect())
    assert processor is not None
    with pytest.raises(ValueError, match="naive datetime"):
        processor(datetime(2026, 1, 1))


def test_stored_text_round_trips(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
    table.metadata.create_all(engine)
    values = _values()[:50]
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": i, "at": v} for i, v in enumerate(values)])
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT id, at FROM t")).all())
        read = dict(conn.execute(select(table.c.id, table.c.at)).all())
    for i, v in enumerate(values):
        assert stored[i] == _two_step(v)
        assert read[i] == v.astimezone(UTC)
    engine.dispose()


def test_other_storage_format_keeps_two_steps() -> None:
    class Custom(UTCDateTime):
        impl = sqlite.DATETIME(storage_format="%(year)04d/%(month)02d/%(day)02d %(hour)02d:%(minute)02d")
        cache_ok = True

    processor = Custom().bind_processor(sqlite.dialect())
    assert processor is not None
    assert processor(datetime(2026, 12, 1, 10, 30, 15, tzinfo=UTC)) == "2026/12/01 10:30"
