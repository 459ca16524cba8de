"""``patinox tenants endpoint``: a tenant's slug, custom domains and host names; list
settings (``egress_hosts``, ``allowed_tools``) given to ``--limit`` as comma-separated
names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import cli, first_json


def test_show_and_set_a_tenants_endpoint(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATINOX_BASE_DOMAIN", "Patinox.Example.")
    assert cli("tenants", "create", "acme").exit_code == 0
    r = cli("tenants", "endpoint", "acme")
    assert r.exit_code == 0, r.output
    got = first_json(r.stdout)
    assert got["slug"] == "acme" and got["hosts"] == ["acme.patinox.example"], got
    r = cli("tenants", "endpoint", "acme", "--slug", "acme-corp", "--domain", "Agents.Acme.Example")
    assert r.exit_code == 0, r.output
    got = first_json(r.stdout)
    assert got["hosts"] == ["acme-corp.patinox.example", "agents.acme.example"], got
    assert cli("tenants", "create", "globex").exit_code == 0
    taken = cli("tenants", "endpoint", "globex", "--slug", "acme")  # acme's former slug: held back
    assert taken.exit_code == 1 and "held back" in taken.output and "Traceback" not in taken.output
    bad = cli("tenants", "endpoint", "globex", "--slug", "xn--cme-8cd")
    assert bad.exit_code == 1 and "not a slug" in bad.output
    r = cli("tenants", "endpoint", "acme", "--no-domains")
    assert first_json(r.stdout)["domains"] == []


def test_list_settings_take_comma_separated_names(data_dir: Path) -> None:
    assert cli("tenants", "create", "acme").exit_code == 0
    r = cli(
        "tenants",
        "update",
        "acme",
        "--limit",
        "egress_hosts=API.example.com, *.example.org",
        "--limit",
        "allowed_tools=http_fetch,calculator",
    )
    assert r.exit_code == 0, r.output
    limits = first_json(cli("tenants", "config", "acme", "--json").stdout)["limits"]
    assert limits["egress_hosts"] == {**limits["egress_hosts"], "value": ["api.example.com", "*.example.org"]}
    assert limits["allowed_tools"]["value"] == ["http_fetch", "calculator"]
    assert limits["allowed_tools"]["source"] == "tenant"
    bad = cli("tenants", "update", "acme", "--limit", "egress_hosts=not a host")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
