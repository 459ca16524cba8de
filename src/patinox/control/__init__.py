"""The control plane: tenant lifecycle, API keys, agent definitions and the run path."""

from patinox.control.agents import AgentPatch, AgentService, AgentSpec
from patinox.control.endpoints import EndpointUpdate, TenantEndpoint, TenantEndpoints
from patinox.control.keys import ADMIN_SCOPE, TENANT_SCOPES, ApiKeys, IssuedKey, OperatorPrincipal
from patinox.control.runs import RunExecutor, RunRequest, RunService
from patinox.control.tenants import Tenant, TenantEvent, TenantManager, TenantSpec, TenantUpdate
from patinox.control.webhooks import WebhookDispatcher, WebhookService, WebhookSettings

__all__ = [
    "ADMIN_SCOPE",
    "TENANT_SCOPES",
    "AgentPatch",
    "AgentService",
    "AgentSpec",
    "ApiKeys",
    "EndpointUpdate",
    "IssuedKey",
    "OperatorPrincipal",
    "RunExecutor",
    "RunRequest",
    "RunService",
    "Tenant",
    "TenantEndpoint",
    "TenantEndpoints",
    "TenantEvent",
    "TenantManager",
    "TenantSpec",
    "TenantUpdate",
    "WebhookDispatcher",
    "WebhookService",
    "WebhookSettings",
]
