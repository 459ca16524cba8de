"""The isolation conformance suite: proof, on your own deployment, that tenants stay apart.

Users of other multi-tenant agent platforms have hit cross-tenant leaks through pooled
connections carrying the previous tenant's setting, thread pools and workers running
with the wrong (or a default) tenant, views running with their owner's rights, shared
caches keyed without the tenant, and deletions that left data behind. This suite runs
those failure modes against the storage models of a real deployment and reports one
line per check.

How to run::

    patinox conformance --admin-url postgresql://postgres@127.0.0.1:5432/postgres

or from Python (or pytest, see ``tests/conformance/test_suite.py``)::

    from patinox.conformance import run_conformance
    result = run_conformance(admin_url="postgresql://postgres@127.0.0.1:5432/postgres")
    assert result.ok

It prints ``PASS <model> <check>`` or ``FAIL <model> <check>: <reason>`` per check and
closes with exactly ``N passed, M failed`` (a scratch database that could not be dropped
adds a ``FAIL postgres cleanup: ...`` line). The returned :class:`ConformanceResult`
holds every outcome; a failure's ``detail`` has the traceback and, for the state
machine, the steps hypothesis ran. A run with the default 30 examples takes a few
minutes (the state machine dominates: every step is real requests on a real database).

With an admin URL (a role that can create databases and roles and bypasses row-level
security, i.e. a superuser) it creates a scratch database ``patinox_conf_<hex>`` with its
own owner and application roles (:func:`patinox.storage.postgres.bootstrap`), runs the
PostgreSQL models ``pg-pool``, ``pg-bridge`` and ``pg-silo`` there with the server
connected **as the application role**, and drops the database, its silo databases and
both roles at the end, also on failure. SQLite ``pool`` and ``silo`` run in a temporary
directory. Without an admin URL only SQLite is checked, and the output says so. Each
deployment is served by the real HTTP app in-process
(``TestClient(create_app(runtime=...))``) with its own KEK file.

What is checked, on every storage model:

``stateful-isolation``
    A hypothesis state machine (``examples`` examples of up to 25 steps) with three
    tenants doing random agent creates/reads/updates/deletes/lists, memory
    writes/reads/deletes/lists, sync and async runs (``simulated:instant``), including
    ``memory_get`` tool runs on keys of other tenants, suspensions, resumptions, tenant
    deletions and re-creations under the same name. Every stored secret is a unique
    marker string; no response to a tenant may contain another tenant's marker or id
    (unless it sent that itself); after every step, every tenant's lists that the step
    could have changed equal a model of what it owns; a foreign id answers exactly like
    a missing one (status and body, modulo the id); suspended tenants get
    ``403 tenant_suspended``, keys of deleted tenants ``401``.
``no-plaintext-at-rest``
    Raw storage (SQLite files with WAL and silo files; on PostgreSQL every row of every
    table in every schema of the main and silo databases, read as the admin) holds no
    plaintext of memory values, run inputs or run outputs, while it does hold the
    same rows' clear columns (so the scan provably reached them).
``foreign-ids-like-missing``
    Every tenant route given another tenant's agent id, run id or memory key answers
    exactly like one given a missing id, and changes nothing of the owner (each case once;
    the state machine samples the same property at random).
``ciphertext-bound-to-row``
    A ciphertext copied (raw, as an attacker with database write access) to another
    row, another column or another tenant's row answers ``500 decryption_failed``.
``delete-shreds-and-purges``
    After deletion the tenant's DEK is gone (``TenantKeysDestroyed``, also in a fresh
    backend, also for ciphertexts saved before), no row with its id is left in any
    table of any schema or database, its schema/database/file is gone, SQLite files no
    longer contain its clear columns, its key answers 401, its neighbour is intact, and
    a tenant re-created with the same name sees nothing of it.
``delete-with-runs-in-flight``
    A tenant deleted while its async runs still wait on the model: nothing is written
    for it after the purge and no new DEK is made for it.
``same-cache-key-material``
    Two tenants storing the same key and value, defining the same agent and asking the
    same question get only their own answers, before and after one of them changes.
``first-dek-race``
    Eight backends write the first payloads of a brand-new tenant at once: one DEK row,
    every row readable by every writer.
``thread-pool-context``
    ``TenantThreadPoolExecutor`` tasks get exactly their submitter's tenant (also with
    two submitters interleaved on shared workers); tasks with none, and plain thread
    pools, fail with ``TenantContextMissing`` — never the default or the previous tenant.
``worker-process-context``
    A spawned worker process sent ``ctx.to_wire()`` opens its own backend and reads
    exactly that tenant's memory; a task with no context gets ``TenantContextMissing``,
    also on a worker that just served a tenant.

On PostgreSQL also:

``pool-of-one-connection`` (pool, bridge)
    A pool of one connection, two tenants alternating: each sees only its own rows and,
    between transactions (also after a failed one), the connection carries no tenant
    setting and sees no row.
``rls-as-app-role``
    The application role is no superuser, lacks BYPASSRLS and owns nothing; every table
    with a ``tenant_id`` column in every schema and database has forced row-level
    security with a policy; with no setting it sees no row, with another tenant's
    setting it can neither read, change nor insert the tenant's rows; every view is
    ``security_invoker`` and there is no materialized view or SECURITY DEFINER function.

Needs ``pip install 'patinox[conformance]'`` (hypothesis), and ``patinox[postgres]`` for
PostgreSQL.
"""

from patinox.conformance._runner import CHECKS, CheckOutcome, ConformanceResult, run_conformance

__all__ = ["CHECKS", "CheckOutcome", "ConformanceResult", "run_conformance"]
