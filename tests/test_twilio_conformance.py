"""Twilio's own example responses (its OpenAPI description's named examples, in ../shared/fixtures/twilio)
served verbatim over real HTTP, loaded by floe into DuckDB: every one parses and loads with its types."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from floe.sandbox import twilio as emu

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "AC" + "a" * 32  # the account of every example


def shared_fixtures() -> Path:
    """`shared/fixtures` beside the repository (CI clones the repo next to `shared`; a git worktree
    nested deeper finds it beside an ancestor). A missing folder fails the tests, it never skips them."""
    for parent in ROOT.parents:
        if (parent / "shared" / "fixtures" / "twilio").is_dir():
            return parent / "shared" / "fixtures"
    pytest.fail(f"the public fixtures are missing: no shared/fixtures/twilio beside {ROOT} or any folder above it; "
                "clone the shared material next to the repository", pytrace=False)


FIXTURES = shared_fixtures() / "twilio"


def body(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


STREAMS = ["calls", "messages", "recordings", "incoming_phone_numbers", "pricing_phone_numbers"]
FULL = {  # list -> its pages (calls: page 2 of the example repeats page 1's calls)
    "Calls": ["calls_list_readFullPage1", "calls_list_readFullPage2", "calls_list_readEmptyDatesGreater"],
    "Messages": ["messages_list_readFullPage1", "messages_list_readEmptySentdateGreater"],
    "Recordings": ["recordings_list_readFull"],
    "IncomingPhoneNumbers": ["incoming_phone_numbers_list_readFull"],
}
PRICING = ["pricing_countries_list_readFull", "pricing_country_fetch_US"]
SOFT_DELETED = "recordings_list_readIncludeSoftDeleted"
EMPTY = {
    "calls": ("Calls", ["calls_list_readEmptyDateFunDateFormats", "calls_list_readEmptyDatesGreater",
                        "calls_list_readEmptyDatesLess"]),
    "messages": ("Messages", [f"messages_list_readEmptySentdate{n}" for n in
                              ("Equals", "Greater", "GreaterFormat1", "GreaterFormat2", "GreaterFormat3", "Less")]),
    "recordings": ("Recordings", ["recordings_list_readEmpty"]),
    "incoming_phone_numbers": ("IncomingPhoneNumbers", ["incoming_phone_numbers_list_readEmpty"]),
}
def fixture_server(lists: dict[str, list[str]], country: str | None = None) -> Callable[..., Any]:
    """An app serving example bodies verbatim: `lists[resource]` are its pages by `Page` number (the
    last one again for any later page), or `lists[resource + "?IncludeSoftDeleted"]` if given for a
    request with `IncludeSoftDeleted=true`; the countries list and `country` for every country fetched."""

    def factory() -> Starlette:
        async def list_page(request: Request) -> Response:
            resource = request.path_params["resource"]
            if request.query_params.get("IncludeSoftDeleted") == "true" and f"{resource}?IncludeSoftDeleted" in lists:
                resource += "?IncludeSoftDeleted"
            pages = lists.get(resource)
            if request.path_params["sid"] != ACCOUNT or not pages:
                return Response(b'{"code": 20404, "message": "not found", "status": 404}', 404)
            page = int(request.query_params.get("Page", "0"))
            return Response(body(pages[min(page, len(pages) - 1)]), media_type="application/json")

        async def countries(request: Request) -> Response:
            return Response(body(PRICING[0]), media_type="application/json")

        async def one_country(request: Request) -> Response:
            assert country is not None
            return Response(body(country), media_type="application/json")

        return Starlette(routes=[
            Route("/2010-04-01/Accounts/{sid}/{resource}.json", list_page),
            Route("/v1/PhoneNumbers/Countries", countries),
            Route("/v1/PhoneNumbers/Countries/{iso}", one_country),
        ])

    return factory


def source(url: str, *streams: str, **extra: Any) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    return {"type": "twilio", "account_sid": ACCOUNT, "auth_token": "example-token", "base_url": url,
            "start_date": (today - timedelta(days=1)).isoformat(), "streams": list(streams), **extra}


def column_types(project: Any, table: str) -> dict[str, str]:
    rows = project.query("SELECT column_name, data_type FROM information_schema.columns "
                         "WHERE table_schema = 'tw' AND table_name = ?", (table,))
    return dict(rows)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_the_full_example_pages_load_with_their_types(emulator: Any, api_project: Any) -> None:
    # Every country of the list (Austria) is fetched; the examples include only the United States' prices.
    server = emulator(fixture_server(FULL, country=PRICING[1]))
    project = api_project(tw=source(server.url, *STREAMS))
    results = project.run()
    assert all(r.ok for r in results), [r.error for r in results]

    # Calls: page 2 of the example repeats page 1's two calls; they land once (merge on sid).
    calls = column_types(project, "calls")
    assert {calls[c] for c in ("date_created", "date_updated", "start_time", "end_time")} == {"TIMESTAMP WITH TIME ZONE"}
    assert (calls["duration"], calls["queue_time"], calls["price"]) == ("BIGINT", "BIGINT", "DECIMAL(18,6)")
    assert project.query(
        "SELECT sid, status, start_time, end_time, duration, queue_time, price, "
        "price_unit, to_formatted FROM tw.calls ORDER BY sid"
    ) == [
        ("CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0", "completed", utc(2019, 10, 18, 16, 2), utc(2019, 10, 18, 16, 3), 3, 1000,
         Decimal("-0.1"), "JPY", "(305) 191-3580"),
        ("CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "completed", utc(2019, 10, 18, 17, 2), utc(2019, 10, 18, 17, 3), 4, 1000,
         Decimal("-0.2"), "USD", "(305) 191-3581"),
    ]
    assert project.query("SELECT sum(price) FROM tw.calls") == [(Decimal("-0.3"),)]
    assert not {"uri", "subresource_uris"} & set(calls)  # they follow from account_sid and sid (test below)

    messages = column_types(project, "messages")
    assert (messages["date_sent"], messages["error_code"], messages["num_media"]) == (
        "TIMESTAMP WITH TIME ZONE", "BIGINT", "BIGINT")
    assert project.query("SELECT sid, status, date_sent, error_code, error_message, num_media, num_segments, price, "
                         "body_length FROM tw.messages ORDER BY sid") == [
        ("MMc26223853f8c46b4ab7dfaa6abba0a26", "received", utc(2019, 5, 24, 17, 44, 49), 30004, "Message blocked", 3,
         1, Decimal("-0.0075"), 22),
        ("SMded05904ccb347238880ca9264e8fe1c", "sent", utc(2019, 5, 24, 17, 44, 50), None, None, 0, 1,
         Decimal("-0.0075"), 7),
    ]
    assert project.query("SELECT sum(price) FROM tw.messages") == [(Decimal("-0.015"),)]

    recordings = column_types(project, "recordings")
    assert (recordings["channels"], recordings["duration"], recordings["encryption_details"]) == (
        "BIGINT", "BIGINT", "JSON")
    assert project.query("SELECT sid, status, date_created, duration, channels, price, "
                         "json_extract_string(encryption_details, '$.encryption_public_key_sid') FROM tw.recordings") == [
        ("REaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "completed", utc(2016, 10, 14, 21, 56, 34), 4, 1, Decimal("0.04"),
         "CRaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")]

    numbers = column_types(project, "incoming_phone_numbers")
    assert (numbers["beta"], numbers["capability_sms"], numbers["date_created"]) == (
        "BOOLEAN", "BOOLEAN", "TIMESTAMP WITH TIME ZONE")
    assert project.query("SELECT sid, phone_number, beta, capability_voice, capability_sms, sms_url, voice_url, "
                         "emergency_address_status, type FROM tw.incoming_phone_numbers") == [
        ("PNaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "+18089255327", None, True, False, "", None, "registered", "local")]

    # Pricing: the countries list's `meta` envelope (absolute URLs, next_page_url null), prices sent as strings.
    assert project.query("SELECT country, iso_country, price_unit, number_type, base_price, current_price "
                         "FROM tw.pricing_phone_numbers ORDER BY number_type") == [
        ("United States", "US", "USD", "local", Decimal("1.00"), Decimal("1.00")),
        ("United States", "US", "USD", "toll free", Decimal("2.00"), Decimal("2.00"))]


def test_uri_and_subresource_uris_of_the_examples_follow_from_account_and_sid() -> None:
    """Why floe does not store them: in every example record, `uri` is
    `/2010-04-01/Accounts/<account_sid>/<List>/<sid>.json` and each link is `uri` without `.json`, then
    `/<Name>.json` (e.g. `.../Calls/CA…/UserDefinedMessages.json`)."""
    checked = 0
    for path in sorted(FIXTURES.glob("*_list_*.json")):
        document = json.loads(path.read_text())
        list_name = urlsplit(document.get("uri", "")).path.rsplit("/", 1)[-1].removesuffix(".json")
        for records in document.values():
            if not isinstance(records, list) or not list_name:
                continue
            for record in records:
                assert record["uri"] == f"/2010-04-01/Accounts/{record['account_sid']}/{list_name}/{record['sid']}.json"
                for name, link in (record.get("subresource_uris") or {}).items():
                    base, _, leaf = link.rpartition("/")
                    assert base == record["uri"].removesuffix(".json"), (path.name, name)
                    assert leaf.removesuffix(".json").lower() == name.replace("_", ""), (path.name, name)
                    checked += 1
    assert checked == 2 * 9 * 2 + 2 * 2 + 3 * 2  # calls (two pages of two), messages, recordings


def test_a_soft_deleted_recording_replaces_the_loaded_one(emulator: Any, api_project: Any) -> None:
    """The same recording, loaded as `completed` and later listed (IncludeSoftDeleted) as `deleted`."""
    pages = {"Recordings": FULL["Recordings"]}
    server = emulator(fixture_server(pages))
    # window_days: the re-read starts a week before the example's 2016 date: one window, not 500
    project = api_project(tw=source(server.url, "recordings", window_days=10_000))
    assert all(r.ok for r in project.run())
    pages.update({"Recordings": [EMPTY["recordings"][1][0]], "Recordings?IncludeSoftDeleted": [SOFT_DELETED]})
    assert all(r.ok for r in project.run())
    assert project.query("SELECT sid, status, date_created, start_time FROM tw.recordings ORDER BY sid") == [
        ("REaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "deleted", utc(2022, 2, 14, 21, 23), utc(2022, 2, 14, 21, 23)),
        ("REaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "completed", utc(2022, 2, 14, 21, 23), utc(2022, 2, 14, 22, 23))]


@pytest.mark.parametrize(("stream", "resource", "name"),
                         [(s, r, n) for s, (r, names) in EMPTY.items() for n in names])
def test_an_empty_example_page_is_a_successful_empty_load(emulator: Any, api_project: Any, stream: str,
                                                          resource: str, name: str) -> None:
    server = emulator(fixture_server({resource: [name]}))
    project = api_project(tw=source(server.url, stream))
    results = project.run()
    assert [r.ok for r in results] == [True], [r.error for r in results]
    assert project.query("SELECT count(*) FROM main._floe_loads WHERE status = 'committed' AND stream = ?",
                         (stream,)) == [(1,)]
    tables = {r[0] for r in project.query("SELECT table_name FROM information_schema.tables "
                                          "WHERE table_schema = 'tw'")}
    if stream in tables:
        assert project.query(f"SELECT count(*) FROM tw.{stream}") == [(0,)]


def example_filters() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(fixture, list, filter parameters) from the `uri` of every list example: the spellings Twilio accepted."""
    out = []
    for path in sorted(FIXTURES.glob("*_list_*.json")):
        document = json.loads(path.read_text())
        if "uri" not in document:  # the pricing list: its own `meta` envelope
            continue
        parts = urlsplit(document["uri"])
        resource = parts.path.rsplit("/", 1)[1].removesuffix(".json")
        params = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("PageSize", "Page", "PageToken")]
        out.append((path.stem, resource, params))
    return out


CURSORS = {"Calls": "start_time", "Messages": "date_sent", "Recordings": "date_created"}


@pytest.mark.parametrize(("name", "resource", "params"), example_filters(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_emulator_answers_every_filter_spelling_of_the_examples(emulator: Any, name: str, resource: str,
                                                                     params: list[tuple[str, str]]) -> None:
    """The filters of the examples (`DateSent>=Wed, 19 Jun 2019 22:04:00 -0000`, `StartTime<=06/11/2019
    22:05:25 MST`, `Status=completed`, ...) are accepted, and select what they say: nothing before
    those (2008-2019) dates, and from them on only records whose date is set."""
    server = emulator(emu.create_app, size=50, days=2)
    sid, token = server.app.state.twilio.credentials()[0]
    response = httpx.get(f"{server.url}/2010-04-01/Accounts/{sid}/{resource}.json", params=params, auth=(sid, token))
    assert response.status_code == 200, response.text
    records = response.json()[name.split("_list_")[0]]
    dates = [k for k, _ in params if k.rstrip("<>") in ("StartTime", "EndTime", "DateSent", "DateCreated")]
    if any(not k.endswith(">") for k in dates):  # on or before a day long past
        assert records == []
    elif dates:
        cursor = CURSORS[resource]
        lst = server.app.state.twilio.list(sid, resource.lower())
        dated = [r for r in map(lst.record, range(lst.count)) if r[cursor] is not None]
        status = dict(params).get("Status")
        expected = [r["sid"] for r in dated if status in (None, r["status"]) and
                    ("EndTime>" not in dates or r["end_time"] is not None)]
        assert [r["sid"] for r in records] == expected[::-1][:50]
        assert len(dated) < lst.count  # some records have no date: a date filter leaves them out
    else:
        assert records


def test_every_example_is_loaded_by_a_test() -> None:
    """A new example in the shared folder needs a test here."""
    used = {name for pages in FULL.values() for name in pages} | {*PRICING, SOFT_DELETED}
    used |= {name for _, names in EMPTY.values() for name in names}
    files = {p.stem for p in FIXTURES.glob("*.json")}
    assert len(files) == 19 and used == files, sorted(files ^ used)
