"""The ``dedicated`` level: a tenant's cgroup holds cores no other tenant's work uses, this
process keeps off them, a tenant that cannot get its cores is refused before anything of it
is made, and deleting it gives them back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patinox.control import TenantSpec
from patinox.errors import IsolationUnavailable
from patinox.isolation.cgroups import parse_cpus
from patinox.isolation.cores import CoreAllocator
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, StorageModel
from tests.conftest import Deployment
from tests.isolation.test_container import code_result, python_call, run, sandboxed_tenant

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the dedicated level's tests need root: real cpuset cgroups (CI runs them as root)")


def _cores(runtime: Runtime) -> CoreAllocator:
    executor = runtime.process_executor
    assert executor is not None and executor.cores is not None
    return executor.cores


def _need_two_cores(runtime: Runtime) -> None:
    if len(_cores(runtime).cpus) < 2:
        pytest.fail("the dedicated level needs a host with 2 cores or more (one stays shared; CI has 2)")


def _take_every_free_core(runtime: Runtime, deployment: Deployment) -> None:
    """Dedicated tenants until no core is free (none more on a 2-core host)."""
    n = 0
    while _cores(runtime).free_count() > 0:
        n += 1
        runtime.tenants.create(
            TenantSpec(
                name=f"filler-{n}",
                isolation_level=IsolationLevel.DEDICATED,
                storage_model=StorageModel(deployment.storage_model),
            ),
            actor="test",
        )


def cpuset_of(runtime: Runtime, tenant_id: str) -> tuple[int, ...]:
    prefix = runtime.settings.exec_cgroup_prefix
    return parse_cpus(Path(f"/sys/fs/cgroup/cpuset/{prefix}/{tenant_id}/cpuset.cpus").read_text())


def test_a_dedicated_tenant_gets_cores_no_other_work_uses(runtime: Runtime, deployment: Deployment) -> None:
    _need_two_cores(runtime)
    shared_ctx, shared_agent = sandboxed_tenant(
        runtime, deployment, name="shared", level=IsolationLevel.CONTAINER
    )
    assert run(runtime, shared_ctx, shared_agent, python_call("print(1)"))["status"] == "succeeded"
    ctx, agent = sandboxed_tenant(runtime, deployment, name="own-cores", level=IsolationLevel.DEDICATED)
    row = run(runtime, ctx, agent, python_call("import os; print(sorted(os.sched_getaffinity(0)))"))
    assert row["status"] == "succeeded", row
    assert runtime.process_executor is not None and runtime.process_executor.cores is not None
    cores = runtime.process_executor.cores.reserved(ctx.tenant_id)
    assert len(cores) == ctx.limits.dedicated_cores
    # Its cgroup holds its cores only; the other tenant's and this process keep off them.
    assert cpuset_of(runtime, ctx.tenant_id) == cores
    assert not set(cpuset_of(runtime, shared_ctx.tenant_id)) & set(cores)
    assert not set(os.sched_getaffinity(0)) & set(cores)
    # The code inside runs on them.
    assert code_result(row)["stdout"].strip() == str(list(cores))


def test_a_second_dedicated_tenant_is_refused_while_no_core_is_free_and_nothing_of_it_is_made(
    runtime: Runtime, deployment: Deployment
) -> None:
    _need_two_cores(runtime)
    first, _ = sandboxed_tenant(runtime, deployment, name="first", level=IsolationLevel.DEDICATED)
    _take_every_free_core(runtime, deployment)
    before = {t.id for t in runtime.tenants.list(include_deleted=True)}
    spec = TenantSpec(
        name="second",
        isolation_level=IsolationLevel.DEDICATED,
        storage_model=StorageModel(deployment.storage_model),
    )
    with pytest.raises(IsolationUnavailable) as refused:
        runtime.tenants.create(spec, actor="test")
    host_cores = len(_cores(runtime).cpus)
    assert refused.value.fields["free_cores"] == 0
    assert f"0 of this host's {host_cores} are free" in refused.value.message
    assert {t.id for t in runtime.tenants.list(include_deleted=True)} == before
    # Deleting the first gives its core back: the second can be created then.
    runtime.tenants.delete(first.tenant_id, actor="test")
    assert runtime.process_executor is not None and runtime.process_executor.cores is not None
    assert runtime.process_executor.cores.reserved(first.tenant_id) == ()
    second = runtime.tenants.create(spec, actor="test")
    assert runtime.process_executor.cores.reserved(second.id) != ()


def test_a_live_change_to_dedicated_reserves_cores_first_and_a_change_away_gives_them_back(
    runtime: Runtime, deployment: Deployment
) -> None:
    _need_two_cores(runtime)
    spec = TenantSpec(
        name="first",
        isolation_level=IsolationLevel.DEDICATED,
        storage_model=StorageModel(deployment.storage_model),
    )
    first = runtime.tenants.create(spec, actor="test")
    _take_every_free_core(runtime, deployment)
    other = runtime.tenants.create(
        TenantSpec(name="other", storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    executor = runtime.process_executor
    assert executor is not None and executor.cores is not None
    # No core is free: the change is refused before any hold, and nothing of it stays.
    with pytest.raises(IsolationUnavailable):
        runtime.tenants.change_level(other.id, IsolationLevel.DEDICATED, actor="test", grace_s=0)
    row = runtime.backend.get_tenant(other.id)
    assert (row["isolation_level"], row["moving_to"]) == ("namespace", None)
    assert executor.cores.reserved(other.id) == ()
    # Moving the first tenant off dedicated gives its core back ...
    runtime.tenants.change_level(first.id, IsolationLevel.CONTAINER, actor="test", grace_s=0)
    assert executor.cores.reserved(first.id) == ()
    # ... so the other can now move there, and holds it.
    runtime.tenants.change_level(other.id, IsolationLevel.DEDICATED, actor="test", grace_s=0)
    assert runtime.backend.get_tenant(other.id)["isolation_level"] == "dedicated"
    assert len(executor.cores.reserved(other.id)) == 1
