"""What a tenant's own host name costs a request, side by side with the base host.

With ``PATINOX_BASE_DOMAIN`` set, a request on ``<slug>.<base domain>`` also looks up which
tenant holds the host name (:mod:`patinox.control.endpoints`, read through the control-plane
cache); one on the base host does not. This bench builds one embedded deployment (SQLite,
limits in memory, rate limits raised so nothing is refused), one tenant and its key, then
sends ``--requests`` ``GET /v1/agents`` on each host, interleaved (base, tenant, base, ...)
so a slow spell of the machine falls on both, through Starlette's in-process test client.
It reports each host's median wall time (the first tenth of each side not counted) and the
ratio tenant / base. No timing is asserted. Run:
``.venv/bin/python bench/tenant_hosts.py [--requests 3000]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.control import TenantSpec
from patinox.runtime import Runtime, Settings
from patinox.storage.crypto import FileKeyProvider
from patinox.tenancy import LimitOverrides

BASE = "patinox.test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests on each host")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="patinox-bench-hosts-") as tmp:
        d = Path(tmp)
        FileKeyProvider.create(d / "kek.json")
        settings = Settings(
            database_url=f"sqlite:///{d / 'patinox.db'}",
            kek_url=f"file://{d / 'kek.json'}",
            base_domain=BASE,
            isolation_levels=frozenset(),
            exec_root=d / "exec",
        )
        rt = Runtime.build(settings)
        spec = TenantSpec(
            name="acme", limits=LimitOverrides(requests_per_minute=10**9, key_requests_per_minute=10**9)
        )
        tenant = rt.tenants.create(spec, actor="bench")
        key = rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="bench").secret
        hosts = {"base host": BASE, "tenant host": f"acme.{BASE}"}
        times: dict[str, list[float]] = {name: [] for name in hosts}
        with TestClient(create_app(runtime=rt)) as client:
            for _ in range(args.requests):
                for name, host in hosts.items():
                    started = time.perf_counter()
                    r = client.get("/v1/agents", headers={"Authorization": f"Bearer {key}", "Host": host})
                    times[name].append(time.perf_counter() - started)
                    if r.status_code != 200:
                        raise SystemExit(f"{host}: {r.status_code} {r.text}")
        rt.close()
    skip = args.requests // 10
    medians = {name: statistics.median(values[skip:]) * 1000 for name, values in times.items()}
    for name, ms in medians.items():
        print(f"{name:12} median {ms:.3f} ms")
    print(f"ratio tenant host / base host: {medians['tenant host'] / medians['base host']:.3f}")


if __name__ == "__main__":
    main()
