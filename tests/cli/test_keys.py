"""Key commands: clear messages for wrong combinations, revocation by key id alone."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import assert_error, cli, first_json


def test_operator_with_a_tenant_id(acme: str) -> None:
    result = cli("keys", "create", "acme", "--operator")
    assert_error(result, "error: --operator creates an operator key and takes no TENANT_ID")


def test_neither_tenant_nor_operator(data_dir: Path) -> None:
    assert_error(cli("keys", "create"), "error: give a TENANT_ID, or --operator for an operator key")


def test_revoke_a_tenant_key_without_naming_its_tenant(acme: str) -> None:
    created = first_json(cli("keys", "create", "acme", "--name", "app").stdout)
    result = cli("keys", "revoke", created["id"])
    assert result.exit_code == 0, result.output
    revoked = first_json(result.stdout)
    assert revoked["id"] == created["id"] and revoked["tenant_id"] == acme
    assert revoked["revoked_at"] is not None
    assert "yes" in cli("keys", "list", "acme").stdout


def test_revoke_an_operator_key(data_dir: Path) -> None:
    created = first_json(cli("keys", "create", "--operator", "--name", "second").stdout)
    result = cli("keys", "revoke", created["id"])
    assert result.exit_code == 0, result.output
    assert first_json(result.stdout)["revoked_at"] is not None


def test_revoke_with_the_wrong_tenant_is_not_found(acme: str) -> None:
    assert cli("tenants", "create", "other").exit_code == 0
    created = first_json(cli("keys", "create", "acme").stdout)
    assert_error(cli("keys", "revoke", created["id"], "--tenant", "other"), "error: ", "not found")


def test_revoke_an_unknown_key(acme: str) -> None:
    assert_error(cli("keys", "revoke", "ak_nosuchkey"), "error: ", "ak_nosuchkey", "not found")


def test_keys_rotate_and_expiry_from_the_cli(data_dir: Path) -> None:
    assert cli("tenants", "create", "acme").exit_code == 0
    made = cli("keys", "create", "acme", "--name", "ci", "--scope", "read", "--expires-in-s", "3600")
    assert made.exit_code == 0, made.output
    key = first_json(made.output)
    assert key["expires_at"] is not None and key["scopes"] == ["read"]
    rotated = cli("keys", "rotate", key["id"], "--overlap-s", "0")
    assert rotated.exit_code == 0, rotated.output
    new = first_json(rotated.output)
    assert new["name"] == "ci" and new["id"] != key["id"] and "New key" in rotated.output
    listing = cli("keys", "list", "acme").output
    assert key["prefix"] in listing and new["prefix"] in listing
    bad = cli("keys", "rotate", "key_nope")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    negative = cli("keys", "create", "acme", "--expires-in-s", "0")
    assert negative.exit_code != 0 and "Traceback" not in negative.output
