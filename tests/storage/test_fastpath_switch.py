"""The SQLAlchemy-internal speed-ups (``patinox.storage._fast``) change how fast rows are
written, never what is written: the run path stores the same rows with
``PATINOX_SQLA_FASTPATH=0`` as with the speed-ups on.

The switch is read once per process, so each side runs in a child process of its own, on
a fresh embedded (SQLite) deployment: a tenant, an agent, one synchronous run on the
simulated model that calls a tool (agent memory), its usage and audit. Every row of every
table is then read back raw (``sqlite3``, no SQLAlchemy type processing), so datetimes,
JSON, booleans and blobs are compared as stored. What differs between two deployments by
nature is replaced by its shape: ids keep their prefix, datetimes must have SQLAlchemy's
``YYYY-MM-DD HH:MM:SS.ffffff`` form, dates theirs, floats (durations, tags) their type, random bytes
their length; sealed payloads (fresh nonces) are compared opened, with their blob length
and header.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import asyncio, json, re, sqlite3, sys
from pathlib import Path

from patinox import Runtime, Settings
from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.storage import _fast, sealed_columns
from patinox.storage import schema as s
from patinox.storage.crypto import FileKeyProvider

data = Path(sys.argv[1])
data.mkdir()
FileKeyProvider.create(data / "kek.json")
db = data / "patinox.db"
rt = Runtime.build(
    Settings(database_url=f"sqlite:///{db}", kek_url=f"file://{data / 'kek.json'}", embedded_workers=0)
)
tenant = rt.tenants.create(TenantSpec(name="alpha"), actor="test")
ctx = rt.keys.authenticate(rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test").secret)
agent = rt.agents.create(ctx, AgentSpec(name="a", model="simulated:instant", tools=["memory_put"]))
prompt = 'remember this\n/call memory_put {"key": "colour", "value": "teal"}'
run = asyncio.run(rt.runs.start(ctx, agent["id"], RunRequest(input=prompt, output_tokens=8)))
assert run["status"] == "succeeded", run

ID = re.compile(r"\b([a-z]{2,5})_[0-9a-z]{26}\b")
DATETIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
DATE = re.compile(r"^\d{4}-\d\d-\d\d$")  # a quota period: the two sides may straddle midnight
RANDOM = {("api_keys", "prefix"), ("api_keys", "secret_hash")}
sealed = {(c.table, c.column): c for c in sealed_columns()}
sealer = rt.backend.acting_on(tenant.id)._sealer


def shape(table, column, value, row):
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return "<float>"
    if isinstance(value, bytes):
        c = sealed.get((table, column))
        if c is None:
            return f"<{len(value)} bytes>"
        opened = sealer.open(c.aad, row[c.key_column], value)
        return {"len": len(value), "header": value[:5].hex(), "open": opened}
    if (table, column) in RANDOM:
        return f"<random {len(value)}>"
    if DATETIME.match(value):
        return "<datetime>"
    if DATE.match(value):
        return "<date>"
    return ID.sub(r"\1_<id>", value)


raw = sqlite3.connect(db)
raw.row_factory = sqlite3.Row
tables = {}
for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
    if name.startswith("sqlite_") or name == "alembic_version":
        continue
    rows = [
        {k: shape(name, k, r[k], dict(r)) for k in r.keys()} for r in raw.execute(f'SELECT * FROM "{name}"')
    ]
    tables[name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
raw.close()
engine = rt.backend.engine
print(json.dumps({
    "enabled": _fast.ENABLED,
    "kept": engine.__dict__.get("_patinox_kept") is not None,
    "one_step_datetimes": s.UTCDateTime().bind_processor(engine.dialect) is _fast._sqlite_utc_text,
    "writes": _fast.execute_write.__name__,
    "tables": tables,
}))
rt.backend.close()
"""


def _stored(tmp_path: Path, switch: str) -> dict[str, Any]:
    env = {**os.environ, "PATINOX_SQLA_FASTPATH": switch}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / f"fastpath-{switch}")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_run_path_stores_the_same_rows_with_the_speed_ups_off(tmp_path: Path) -> None:
    on, off = _stored(tmp_path, "1"), _stored(tmp_path, "0")
    # The switch took effect on each side.
    switched = ("enabled", "kept", "one_step_datetimes", "writes")
    assert [on[k] for k in switched] == [True, True, True, "fast_write"]
    assert [off[k] for k in switched] == [False, False, False, "plain_write"]
    # The run wrote what a run writes: otherwise the comparison below would prove little.
    tables = on["tables"]
    assert [r["status"] for r in tables["runs"]] == ["succeeded"]
    assert tables["runs"][0]["input"]["open"].endswith('"value": "teal"}')
    assert tables["runs"][0]["output"]["open"].startswith("[simulated]")
    assert [r["value"]["open"] for r in tables["memory"]] == ["teal"]
    assert len(tables["usage_records"]) == 1 and tables["usage_records"][0]["input_tokens"] > 0
    assert len(tables["audit_log"]) >= 3
    assert on["tables"] == off["tables"]
