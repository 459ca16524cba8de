"""Model selection: per-plan and per-tenant allow-lists of models and a default model, in
the layered configuration. A model outside the list is refused with ``403
model_not_allowed`` on every route that reaches a model: an agent's definition or update,
a run (the list changed since the agent was defined), the OpenAI-compatible route (in
OpenAI's error shape), and with any key of the tenant, a newly made one included."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import auth

ONLY_A = {"allowed_models": ["simulated:instant"], "default_model": "simulated:instant"}
MODEL_B = "simulated:ttft_ms=0,tpot_ms=0"


def refused(r: Any) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "model_not_allowed", r.text


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_a_tenant_restricted_to_model_a_cannot_reach_model_b(
    client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("acme", "pro", ONLY_A)
    # Definitions: model B refused, model A accepted, no model takes the default.
    refused(client.post("/v1/agents", json={"name": "b", "model": MODEL_B}, headers=t.h))
    agent = client.post("/v1/agents", json={"name": "a", "model": "simulated:instant"}, headers=t.h)
    assert agent.status_code == 201, agent.text
    default = client.post("/v1/agents", json={"name": "d"}, headers=t.h)
    assert default.status_code == 201 and default.json()["model"] == "simulated:instant", default.text
    refused(client.patch(f"/v1/agents/{agent.json()['id']}", json={"model": MODEL_B}, headers=t.h))
    assert client.get(f"/v1/agents/{agent.json()['id']}", headers=t.h).json()["model"] == "simulated:instant"
    # A newly made key of the tenant is held to the same list.
    key = client.post(f"/admin/tenants/{t.id}/keys", json={"name": "new"}, headers=auth(operator_key))
    refused(client.post("/v1/agents", json={"name": "b2", "model": MODEL_B}, headers=auth(key.json()["key"])))
    # Runs reach model A while it is allowed.
    run = t.run(agent.json()["id"])
    assert run.status_code == 200, run.text

    # The operator narrows the list: the agent's model is no longer allowed, so its runs
    # are refused, synchronous, asynchronous or through the OpenAI-compatible route.
    r = client.patch(
        f"/admin/tenants/{t.id}",
        json={"limits": {"allowed_models": [MODEL_B], "default_model": MODEL_B}},
        headers=auth(operator_key),
    )
    assert r.status_code == 200, r.text
    refused(t.run(agent.json()["id"]))
    refused(t.run(agent.json()["id"], mode="async"))
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
        headers=t.h,
    )
    assert chat.status_code == 403, chat.text
    assert chat.json()["error"]["code"] == "model_not_allowed"
    assert chat.json()["error"]["type"] == "permission_error"
    runs = client.get("/v1/runs", headers=t.h).json()
    assert len(runs) == 1  # only the run made while model A was allowed


@pytest.mark.only_deployments("sqlite-pool")
def test_the_layers_of_model_settings_and_bad_overrides(
    client: TestClient, operator_key: str, make_tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-shared")  # provider models are configured
    free, pro = make_tenant("free-one", "free"), make_tenant("pro-one", "pro")
    own = make_tenant("own", "pro", ONLY_A)
    layers = {}
    for t in (free, pro, own):
        limits = client.get("/v1/config", headers=t.h).json()["limits"]
        layers[t.id] = (limits["allowed_models"]["source"], limits["default_model"]["source"])
    assert layers[free.id] == ("plan", "default")
    assert layers[pro.id] == ("default", "default")
    assert layers[own.id] == ("tenant", "tenant")
    assert client.get("/v1/config", headers=pro.h).json()["limits"]["allowed_models"]["value"] == ["*"]
    # The free plan keeps the simulated models and refuses a large provider model.
    assert (
        "simulated*" in client.get("/v1/config", headers=free.h).json()["limits"]["allowed_models"]["value"]
    )
    free.agent("sim", model="simulated")
    free.agent("small", model="openai:gpt-4o-mini")
    refused(client.post("/v1/agents", json={"name": "large", "model": "openai:gpt-4o"}, headers=free.h))
    pro.agent("large", model="openai:gpt-4o")
    for bad in (
        {"allowed_models": ["simulated:instant"], "default_model": "simulated"},
        {"allowed_models": []},
        {"allowed_models": ["bad pattern"]},
    ):
        r = client.patch(f"/admin/tenants/{pro.id}", json={"limits": bad}, headers=auth(operator_key))
        assert r.status_code == 422, (bad, r.text)
