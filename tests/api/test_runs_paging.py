"""GET /v1/runs pages by cursor and by a byte budget, so one listing is bounded."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from patinox.api.routers import tenant as tenant_routes


def _pages(client: TestClient, first: str, headers: dict[str, str]) -> list[list[str]]:
    pages, url = [], first
    while url:
        r = client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        pages.append([x["id"] for x in r.json()])
        link = r.headers.get("Link")
        url = link.split(";")[0].strip("<>") if link else ""
        assert len(pages) < 50
    return pages


def test_pages_by_cursor_cover_every_run_once_in_order(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"requests_per_minute": 1000})
    agent = a.agent()
    made = [a.run(agent, f"question {i}", output_tokens=2).json()["id"] for i in range(5)]
    pages = _pages(client, "/v1/runs?limit=2", a.h)
    assert [len(p) for p in pages] in ([2, 2, 1], [2, 2, 1, 0])
    assert [i for p in pages for i in p] == list(reversed(made))
    # The cursor keeps the agent filter.
    other = a.agent("other")
    a.run(other, "elsewhere", output_tokens=2)
    r = client.get(f"/v1/runs?limit=2&agent_id={agent}", headers=a.h)
    assert parse_qs(urlparse(r.headers["Link"].split(";")[0].strip("<>")).query)["agent_id"] == [agent]


def test_a_page_stops_at_its_byte_budget(
    client: TestClient, make_tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_tenant("alpha", limits={"requests_per_minute": 1000})
    agent = a.agent()
    prompt = " ".join(["word"] * 400)  # about 2 KB stored per run
    made = [a.run(agent, prompt, output_tokens=2).json()["id"] for _ in range(4)]
    monkeypatch.setattr(tenant_routes, "RUNS_PAGE_BYTES", 5_000)
    pages = _pages(client, "/v1/runs?limit=50", a.h)
    assert all(1 <= len(p) <= 2 for p in pages) and len(pages) >= 2
    assert [i for p in pages for i in p] == list(reversed(made))


def test_another_tenants_run_as_cursor_answers_like_a_missing_one(
    client: TestClient, make_tenant: Any
) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    theirs = a.run(a.agent(), "secret", output_tokens=2).json()["id"]
    b.run(b.agent(), "mine", output_tokens=2)
    foreign = client.get(f"/v1/runs?before={theirs}", headers=b.h)
    absent = "run_00000000000000000000000000"
    missing = client.get(f"/v1/runs?before={absent}", headers=b.h)
    assert foreign.status_code == missing.status_code == 404
    # The same answer, but for the id the caller sent (echoed back).
    assert foreign.text.replace(theirs, "ID") == missing.text.replace(absent, "ID")
