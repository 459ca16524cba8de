"""The public API is curated: this list changes only on purpose."""

from __future__ import annotations

import patinox

EXPECTED = {
    "AgentSpec", "ApiKeys", "IsolationLevel", "PatinoxError", "ResourceLimits", "RunRequest",
    "Runtime", "Settings", "SqlBackend", "Tenant", "TenantContext", "TenantManager", "TenantSpec",
    "TenantState", "TenantStore", "TenantThreadPoolExecutor", "TenantUpdate", "__version__",
    "create_app", "current_tenant", "open_backend", "run_in_thread", "tenant_scope",
}  # fmt: skip


def test_public_api_is_pinned() -> None:
    assert set(patinox.__all__) == EXPECTED
    for name in patinox.__all__:
        assert hasattr(patinox, name), name


def test_error_tree_has_one_root() -> None:
    from patinox import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        if not isinstance(cls, type):  # the functions that find a class by its code
            continue
        assert issubclass(cls, errors.PatinoxError), name
        assert cls.code and cls.http_status
