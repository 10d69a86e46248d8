"""The Pendo emulator over real HTTP: the bulk metadata update, the schema, aggregations, and its errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from floe.sandbox.pendo import create_app
from floe.sandbox.server import RunningServer, serve_in_thread

KEY = "emulator-test-key"
VALUE = "/api/v1/metadata/{kind}/{group}/value"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve_in_thread(create_app(integration_key=KEY, accounts=["a1", "a2", "a3"], visitors=["v1"]))
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"x-pendo-integration-key": KEY}) as c:
        yield c


def post(client: httpx.Client, kind: str, group: str, body: Any, **params: str) -> httpx.Response:
    return client.post(VALUE.format(kind=kind, group=group), json=body, params=params)


def test_bulk_update_reports_updated_missing_and_typed_errors(client, server):
    response = post(client, "account", "custom", [
        {"accountId": "a1", "values": {"plan": "pro", "seats": 5}},
        {"accountId": "nope", "values": {"plan": "pro"}},
        {"accountId": "a2", "values": {"seats": "five"}},
    ])
    assert response.status_code == 200
    body = response.json()
    assert body == {"total": 3, "updated": 1, "failed": 2, "missing": ["nope"],
                    "errors": [{"id": "a2", "error": "seats: expected integer, got str"}]}
    held = server.app.state.pendo.values("account")
    assert held["a1"] == {"plan": "pro", "seats": 5} and held["a2"] == {} and "nope" not in held


def test_create_true_makes_unknown_ids_and_groups_are_kept_apart(client, server):
    body = post(client, "visitor", "agent", [{"visitorId": "v9", "values": {"email": "x@example.com"}}],
                create="true").json()
    assert (body["updated"], body["missing"]) == (1, [])
    assert server.app.state.pendo.values("visitor", "agent")["v9"] == {"email": "x@example.com"}
    assert server.app.state.pendo.values("visitor", "custom")["v9"] == {}


@pytest.mark.parametrize("body,message", [
    (b"[{\"accountId\": ", "malformed JSON"),
    (b"{\"accountId\": \"a1\"}", "must be a JSON array"),
    (b"[{\"accountId\": \"a1\", \"values\": {\"plna\": 1}}]", "missing field mappings"),
    (b"[{\"values\": {\"plan\": \"x\"}}]", "needs accountId"),
])
def test_malformed_json_or_unmapped_fields_are_a_400_and_nothing_changes(client, server, body, message):
    before = server.app.state.pendo.values("account")
    response = client.post(VALUE.format(kind="account", group="custom"), content=body)
    assert response.status_code == 400 and message in response.text
    assert server.app.state.pendo.values("account") == before


def test_a_missing_or_wrong_integration_key_is_a_401(server):
    for headers in ({}, {"x-pendo-integration-key": "wrong"}):
        response = httpx.post(server.url + VALUE.format(kind="account", group="custom"), json=[], headers=headers)
        assert response.status_code == 401


def type_of(entry: dict[str, Any]) -> Any:
    """The type of a schema entry, whichever casing the emulator chose."""
    return entry.get("type", entry.get("Type"))


def test_schema_lists_fields_and_types_by_group_in_mixed_casing(client):
    schema = client.get("/api/v1/metadata/schema/account").json()
    assert type_of(schema["custom"]["seats"]) == "integer" and type_of(schema["custom"]["renewal_date"]) == "time"
    assert type_of(schema["agent"]["name"]) == "string" and type_of(schema["auto"]["lastupdated"]) == "time"
    entries = [entry for group in schema.values() for entry in group.values()]
    assert {"type", "displayName"} <= entries[0].keys()  # real answers vary: both casings appear
    assert any({"Type", "DisplayName"} <= e.keys() for e in entries) and any("type" in e for e in entries)


@pytest.mark.parametrize(("casing", "key"), [("camel", "type"), ("pascal", "Type")])
def test_schema_casing_knob_and_a_field_without_type(casing, key):
    schema = {"account": {"custom": {"plan": "string", "notes": None}}}
    with serve_in_thread(create_app(integration_key=None, schema=schema, schema_casing=casing)) as running:
        answer = httpx.get(running.url + "/api/v1/metadata/schema/account",
                           headers={"x-pendo-integration-key": "any"}).json()
    assert all(key in entry for entry in answer["auto"].values())
    assert answer["custom"]["plan"][key] == "string"
    assert not {"type", "Type"} & answer["custom"]["notes"].keys()


def test_aggregation_lists_filters_selects_sorts_and_counts(client):
    def run(*steps: Any) -> list[dict[str, Any]]:
        response = client.post("/api/v1/aggregation", json={
            "response": {"mimeType": "application/json"}, "request": {"pipeline": list(steps)}})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    everything = run({"source": {"accounts": None}})
    assert {r["accountId"] for r in everything} >= {"a1", "a2", "a3"}
    assert all("lastupdated" in r["metadata"]["auto"] for r in everything)
    page = run({"source": {"accounts": None}}, {"filter": 'accountId > "a1"'}, {"sort": ["-accountId"]},
               {"select": {"id": "accountId"}}, {"limit": 2})
    assert page == [{"id": "a3"}, {"id": "a2"}]
    assert run({"source": {"accounts": None}}, {"filter": "len(accountId) == 2"}, {"count": None}) == [{"count": 3}]


def test_an_unsupported_pipeline_step_is_a_400(client):
    response = client.post("/api/v1/aggregation", json={"request": {"pipeline": [{"source": {"guides": None}}]}})
    assert response.status_code == 400 and "unsupported source" in response.text


def test_time_limit_knob_answers_408_and_applies_nothing():
    app = create_app(integration_key=None, accounts=["a1"], time_limit=1.0, seconds_per_record=0.5)
    with serve_in_thread(app) as running:
        url = running.url + VALUE.format(kind="account", group="custom")
        headers = {"x-pendo-integration-key": "any"}
        three = [{"accountId": "a1", "values": {"plan": "x"}}] * 3
        assert httpx.post(url, json=three, headers=headers).status_code == 408
        assert app.state.pendo.values("account")["a1"] == {}
        assert httpx.post(url, json=three[:2], headers=headers).status_code == 200


def test_injected_faults_come_first_and_429_carries_retry_after(client, server):
    server.app.state.pendo.inject(429, count=1, retry_after=2)
    assert httpx.post(server.url + "/_sandbox/pendo/faults", json={"status": 503}).json() == {"queued": 2}
    first = post(client, "account", "custom", [])
    assert (first.status_code, first.headers["retry-after"]) == (429, "2")
    assert post(client, "account", "custom", []).status_code == 503
    assert post(client, "account", "custom", []).json()["total"] == 0
    stats = httpx.get(server.url + "/_sandbox/pendo/stats").json()
    assert stats["statuses"]["429"] >= 1 and stats["counts"]["account"] >= 3


def test_dropped_and_altered_writes_are_answered_updated_and_a_ui_edit_moves_lastupdated():
    running = serve_in_thread(create_app(integration_key=KEY, accounts=[f"r{i}" for i in range(200)],
                                         drop_rate=0.1, alter_rate=0.1))
    try:
        with httpx.Client(base_url=running.url, headers={"x-pendo-integration-key": KEY}) as c:
            assert c.post("/_sandbox/pendo/writes", json={"drop": ["r0"], "alter": ["r1"]}).status_code == 200
            records = [{"accountId": f"r{i}", "values": {"plan": "enterprise", "seats": 4}} for i in range(200)]
            body = post(c, "account", "custom", records).json()
            assert (body["updated"], body["failed"]) == (200, 0)  # nothing tells the caller
            store = running.app.state.pendo
            held = store.values("account")
            assert held["r0"] == {} and held["r1"] == {"plan": "enter", "seats": 5}
            assert 10 < store.dropped < 40 and 10 < store.altered < 40
            assert sum(1 for v in held.values() if v == {"plan": "enterprise", "seats": 4}) == \
                200 - store.dropped - store.altered
            before = store.records["account"]["r2"]["auto"]["lastupdated"]
            assert c.post("/_sandbox/pendo/edit", json={"kind": "account", "id": "r2",
                                                        "values": {"plan": "trial"}}).status_code == 200
            assert store.values("account")["r2"]["plan"] == "trial"
            assert store.records["account"]["r2"]["auto"]["lastupdated"] >= before
            assert c.post("/_sandbox/pendo/edit", json={"kind": "account", "id": "zz", "values": {}}).status_code == 404
    finally:
        running.stop()
