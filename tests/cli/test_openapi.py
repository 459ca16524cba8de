"""The OpenAPI document: bearer auth for Swagger UI, the error responses the API really gives."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_bearer_security_scheme(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s["type"] == "http" and s["scheme"].lower() == "bearer"]
    for path, method, op in _operations(doc):
        if path.startswith(("/admin", "/v1")):
            assert op.get("security"), (method, path)


def test_error_responses(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, method, op in _operations(doc):
        if path == "/healthz":
            assert set(op["responses"]) == {"200"}, op["responses"]
            assert not op.get("security")
            continue
        if path == "/readyz":
            assert set(op["responses"]) == {"200", "503"}, op["responses"]
            for status in ("200", "503"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ReadinessOut"), status
            assert not op.get("security")
            continue
        # The OpenAI-compatible routes answer errors in OpenAI's shape.
        shape = "/OpenAIErrorOut" if path.startswith(("/v1/chat/", "/v1/models")) else "/ErrorOut"
        for status in ("400", "401", "403", "404", "422", "429", "503"):
            ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(shape), (method, path, status)


def test_the_middleware_still_does_the_auth(client: TestClient, operator_key: str) -> None:
    assert client.get("/admin/plans").status_code == 401
    assert client.get("/admin/plans", headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert client.get("/admin/plans", headers=auth(operator_key)).status_code == 200
    assert client.get("/v1/me", headers=auth(operator_key)).status_code == 403
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # public: never 401
