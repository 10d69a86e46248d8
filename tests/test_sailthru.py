"""Sailthru export files into DuckDB through the real CLI: idempotence, updates, crashes, bad input, PII."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import signal
import zipfile
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from floe.cli import app as cli_app
from floe.infra.killpoints import KILL_AT
from floe.sandbox import sailthru as emulator
from floe.sources.sailthru.files import parse_name
from tests.fixtures.core import read_staged, staged_files
from tests.fixtures.sailthru import SALT, TABLES, Project

EMAIL = re.compile(r"[a-z0-9.]+(@|%40)example\.(com|org)", re.IGNORECASE)
Factory = Callable[..., Project]


def message_keys(paths: list[Path]) -> set[tuple[Any, ...]]:
    """A plain-Python reading of message_blast files: the natural key of every row they explode to.
    Files are read in load order (by date, a day's `_update` after its base file), and a message
    sent again replaces its rows: an update holds its activity so far."""
    latest: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
    for path in sorted(paths, key=lambda p: (re.findall(r"\d{8}", p.name), "_update" in p.name)):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        for line in data.splitlines():
            if not line.strip():
                continue
            doc = orjson.loads(line)
            actions = [("open", o["ts"]["$date"], None) for o in doc.get("opens", [])]
            actions += [("click", c["ts"]["$date"], c["url"]) for c in doc.get("clicks", [])]
            latest[doc["profile_id"], doc["blast_id"]] = actions or [(None, None, None)]
    return {(*message, *action) for message, actions in latest.items() for action in actions}


def table_keys(project: Project) -> list[tuple[Any, ...]]:
    rows = project.query("SELECT profile_id, blast_id, action_name, action_ts, action_url FROM sailthru.message_blast")
    return [(p, b, n, int(ts.timestamp() * 1000) if ts else None, u) for p, b, n, ts, u in rows]


def committed_loads(project: Project) -> int:
    try:
        return int(project.query("SELECT count(*) FROM _floe_loads WHERE status = 'committed'")[0][0])
    except duckdb.Error:  # killed before anything was committed
        return 0


def committed_files(project: Project, stream: str) -> set[str]:
    """The files the stream's ledger (`_floe_files`, written with each commit) records as loaded."""
    try:
        return {r[0] for r in project.query("SELECT entry FROM _floe_files WHERE stream = ?", (stream,))}
    except duckdb.Error:  # killed before anything was committed
        return set()


# --- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("blast.20160401.json", ("blast", None, date(2016, 4, 1), False)),
    ("4484_message_blast.20180912.json.gz", ("message_blast", "4484", date(2018, 9, 12), True)),
    ("4484_message_blast_updates.20180912.json", ("message_blast_updates", "4484", date(2018, 9, 12), False)),
    ("acme_message_transactional_update.20180912.json.gz", ("message_transactional_update", "acme", date(2018, 9, 12), True)),
    ("4484_profile.json.gz", ("profile", "4484", None, True)),  # one-time exports have no date
    ("unknown.20160401.json", None),
    ("blast.20161301.json", None),  # not a date
    ("blast.20160401.csv", None),
])
def test_export_file_names(name: str, expected: tuple[Any, ...] | None) -> None:
    parsed = parse_name(name)
    got = None if parsed is None else (parsed.collection, parsed.client_id, parsed.export_date, parsed.gzipped)
    assert got == expected


# --- shapes of the reference sample ------------------------------------------------------------

def test_reference_shapes_become_rows(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "message_blast.20160401.json").write_text(
        '{ "profile_id" : "a1", "send_time" : "2016-03-31T08:00:03.018", '
        '"opens" : [ { "ts" : { "$date" : 1459431708000 } }, { "ts" : { "$date" : 1459431800000 } } ], '
        '"clicks" : [ { "url" : "http://x.test/1", "ts" : { "$date" : 1459431709000 } } ], '
        '"blast_id" : 6364286, "message_id" : 4, "device" : "Firefox", "message_revenue" : null, '
        '"delivery_status" : null }\n'
        '\n'
        '{ "profile_id" : "a2", "send_time" : "2016-03-31T08:00:04.000", "blast_id" : 6364286, '
        '"message_id" : 5, "device" : null, "message_revenue" : null, "delivery_status" : null }\n'
    )
    (export / "message_transactional.20160401.json").write_text(
        '{ "profile_id" : "a1", "template" : "X BX Welcome", "send_time" : "2016-03-31T00:00:12.686", '
        '"clicks" : [], "opens" : [], "device" : null, "message_revenue" : null, "delivery_status" : null, '
        '"id" : "t1" }\n'
    )
    (export / "profile.20160401.json").write_text(
        '{ "id" : "a1", "email" : "<Reader.X@Example.com>", "browser" : { "Firefox" : 3 }, '
        '"geo" : { "city" : { "Austin, TX US" : 2 }, "country" : { "US" : 5 }, "count" : 7 }, '
        '"lists_signup" : { "Daily" : "2015-01-02T03:04:05" }, "vars" : { "n" : 1, "b" : true, "s" : "x", "z" : null }, '
        '"signup_time" : "2015-01-02T03:04:05.123", "create_date" : "2015-01-02T03:04:05", "total_opens" : 681, '
        '"total_unique_opens" : 805, "last_open" : "2016-03-30T10:00:00" }\n'
    )
    project = Project(tmp_path, export)
    project.write_config()
    result = project.cli("run")
    assert result.exit_code == 0, result.output

    edt = 4 * 3600  # send_time is US Eastern (timezone: America/New_York), action times are UTC epoch ms
    rows = project.query("SELECT profile_id, epoch(send_time), action_name, epoch_ms(action_ts), action_url "
                         "FROM sailthru.message_blast ORDER BY profile_id, action_ts")
    assert rows == [
        ("a1", 1459411203.018 + edt, "open", 1459431708000, None),
        ("a1", 1459411203.018 + edt, "click", 1459431709000, "http://x.test/1"),
        ("a1", 1459411203.018 + edt, "open", 1459431800000, None),
        ("a2", 1459411204.0 + edt, None, None, None),
    ]
    assert project.query("SELECT id, action_name FROM sailthru.message_transactional") == [("t1", None)]
    digest = hashlib.sha256((SALT + "reader.x@example.com").encode()).hexdigest()
    assert project.query("SELECT id, email_hash, geo_count, total_unique_opens, optout_reason FROM sailthru.profile") == [
        ("a1", digest, 7, 805, None)]
    assert sorted(project.query("SELECT var, value FROM sailthru.profile_vars")) == [
        ("b", "true"), ("n", "1"), ("s", "x"), ("z", None)]
    assert sorted(project.query("SELECT scope, label, quantity FROM sailthru.profile_geo")) == [
        ("city", "Austin, TX US", 2), ("country", "US", 5)]
    assert project.query("SELECT list, epoch(signup_time) FROM sailthru.profile_lists_signup") == [
        ("Daily", 1420167845.0 + 5 * 3600)]  # January: EST
    assert project.query("SELECT name, collection, export_date, rows FROM sailthru.exports ORDER BY name") == [
        ("message_blast.20160401.json", "message_blast", date(2016, 4, 1), 2),  # a blank line is no record
        ("message_transactional.20160401.json", "message_transactional", date(2016, 4, 1), 1),
        ("profile.20160401.json", "profile", date(2016, 4, 1), 1),
    ]


# --- time zones ---------------------------------------------------------------------------------

NAIVE_TIMES = {  # exported time (no zone) -> UTC when read as US Eastern, DST included
    "send_time": ("2016-03-31T08:00:03.018", "2016-03-31T12:00:03.018"),  # the reference sample's; EDT
    "signup_time": ("2015-01-02T03:04:05.123", "2015-01-02T08:04:05.123"),  # EST
    "create_date": ("2015-07-02T03:04:05", "2015-07-02T07:04:05"),  # EDT
    "last_open": ("2016-03-13T01:30:00", "2016-03-13T06:30:00"),  # just before spring forward: EST
    "last_click": ("2016-03-13T03:30:00", "2016-03-13T07:30:00"),  # just after: EDT
    "last_pageview": ("2016-11-06T01:30:00", "2016-11-06T05:30:00"),  # the repeated hour: its first (EDT)
    "optout_time": ("2016-03-30T10:00:00", "2016-03-30T14:00:00"),
    "list_signup": ("2015-12-31T23:59:59", "2016-01-01T04:59:59"),
}


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize("zone", [None, "UTC"])
def test_times_without_a_zone_are_read_as_us_eastern_by_default(tmp_path: Path, zone: str | None) -> None:
    export = tmp_path / "export"
    export.mkdir()
    local = {name: exported for name, (exported, _) in NAIVE_TIMES.items()}
    (export / "message_blast.20160401.json").write_text(
        f'{{ "profile_id" : "a1", "send_time" : "{local["send_time"]}", '
        '"opens" : [ { "ts" : { "$date" : 1459431708000 } } ], "blast_id" : 6364286, "message_id" : 4 }\n')
    profile = {k: local[k] for k in ("signup_time", "create_date", "last_open", "last_click", "last_pageview",
                                     "optout_time")}
    (export / "profile.20160401.json").write_bytes(orjson.dumps(
        {"id": "a1", "lists_signup": {"Daily": local["list_signup"]}, **profile}) + b"\n")
    project = Project(tmp_path, export)
    project.write_config(extra=f"    timezone: {zone}" if zone else "")
    result = project.cli("run")
    assert result.exit_code == 0, result.output

    got = dict(zip(["send_time", "action_ts"], project.query(
        "SELECT epoch(send_time), epoch(action_ts) FROM sailthru.message_blast")[0], strict=True))
    columns = ", ".join(f"epoch({c})" for c in profile)
    got.update(zip(profile, project.query(f"SELECT {columns} FROM sailthru.profile")[0], strict=True))
    got["list_signup"] = project.query("SELECT epoch(signup_time) FROM sailthru.profile_lists_signup")[0][0]
    assert got.pop("action_ts") == 1459431708.0  # `$date` is epoch ms: UTC whatever the zone
    want = {name: utc(exported if zone == "UTC" else eastern) for name, (exported, eastern) in NAIVE_TIMES.items()}
    assert got == pytest.approx(want)


def test_the_shipped_example_loads_and_its_times_fit_us_eastern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """examples/sailthru.yml as shipped (no `timezone:`) on examples/sailthru/: with send_time read as
    UTC every first open would come 4 h or more after its send, as in the public sample."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    shutil.copytree(examples / "sailthru", tmp_path / "examples" / "sailthru")
    config = tmp_path / "examples" / "sailthru.yml"
    shutil.copy(examples / "sailthru.yml", config)
    assert "\n    timezone:" not in config.read_text()  # the default is what is proven here
    monkeypatch.setenv("FLOE_PII_SALT", SALT)
    result = CliRunner().invoke(cli_app, ["run", "-c", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as conn:
        gaps = [r[0] for r in conn.execute(
            "SELECT epoch(MIN(action_ts)) - epoch(MIN(send_time)) FROM sailthru.message_blast "
            "WHERE action_name IS NOT NULL GROUP BY profile_id, blast_id").fetchall()]
        counts = dict(conn.execute("SELECT name, rows FROM sailthru.exports").fetchall())
        messages = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT profile_id, blast_id "
                                "FROM sailthru.message_blast) AS m").fetchall()[0][0]
    assert len(gaps) >= 20 and min(gaps) >= 0 and min(gaps) < 3600
    records = {p.name: sum(1 for line in p.read_bytes().splitlines() if line.strip())
               for p in (tmp_path / "examples" / "sailthru").glob("*.json")}
    assert counts == records
    assert messages == len({(d["profile_id"], d["blast_id"]) for p in (tmp_path / "examples" / "sailthru").glob(
        "message_blast*.json") for d in map(orjson.loads, p.read_bytes().splitlines())})


# --- keys floe does not read ------------------------------------------------------------------------

ACTION_KEYS = {"opens": {"ts"}, "clicks": {"ts", "url"}}
READ_KEYS = {  # what docs/sailthru.md lists as read, per collection
    "blast": {"id", "name", "day"},
    "message_blast": {"profile_id", "send_time", "blast_id", "message_id", "device", "message_revenue",
                      "delivery_status", "id", *ACTION_KEYS},
    "message_transactional": {"id", "profile_id", "template", "send_time", "device", "message_revenue",
                              "delivery_status", *ACTION_KEYS},
    "profile": {"id", "email", "optout_reason", "optout_time", "signup_time", "create_date", "total_opens",
                "total_clicks", "total_unique_opens", "total_unique_clicks", "total_pageviews", "total_messages",
                "last_open", "last_click", "last_pageview", "geo", "browser", "lists_signup", "vars"},
}
KEYS_OF = {"blast": ("id",), "message_blast": ("profile_id", "blast_id"), "message_transactional": ("id",),
           "profile": ("id",)}


def expected_extra(collection: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    """A plain reading of the docs: every non-null value at a key not read, and an action list
    whose actions carry such values."""
    extra = {k: v for k, v in doc.items() if k not in READ_KEYS[collection] and v is not None}
    for name, keys in ACTION_KEYS.items():
        def unread(values: dict[str, Any], read: set[str]) -> bool:
            return any(v is not None for k, v in values.items() if k not in read)
        if any(unread(a, keys) or unread(a.get("ts", {}), {"$date"}) for a in doc.get(name, [])):
            extra[name] = doc[name]
    return extra or None


def test_keys_floe_does_not_read_are_kept_in_extra_and_a_message_keeps_its_id(sailthru_project: Factory) -> None:
    project = sailthru_project(days=3, profiles=80)
    project.write_config(pii="keep")  # compare the kept values verbatim
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    for collection, key in KEYS_OF.items():
        want: dict[tuple[Any, ...], Any] = {}
        ids: dict[tuple[Any, ...], Any] = {}
        for path in sorted(project.export.glob(f"{collection}*.json"), key=lambda p: (p.name.split(".")[1], p.name)):
            for line in path.read_bytes().splitlines():
                doc = orjson.loads(line)
                want[tuple(doc[k] for k in key)] = expected_extra(collection, doc)  # a later file wins
                ids[tuple(doc[k] for k in key)] = doc.get("id")
        rows = project.query(f"SELECT DISTINCT {', '.join(key)}, CAST(extra AS VARCHAR), id FROM sailthru.{collection}")
        got = {tuple(r[:-2]): json.loads(r[-2]) if r[-2] is not None else None for r in rows}
        assert len(rows) == len(got), f"{collection}: the rows of one message disagree"
        assert got == want, collection
        assert sum(v is not None for v in want.values()) >= 3, f"the generator puts unknown keys into {collection}"
        assert {tuple(r[:-2]): r[-1] for r in rows} == ids, collection
    opened = project.query("SELECT COUNT(*) FROM sailthru.message_blast WHERE json_extract(extra, '$.opens') "
                           "IS NOT NULL AND action_name = 'open'")[0][0]
    assert opened > 0, "opens carrying a key floe does not read are kept whole in extra"
    assert project.query("SELECT COUNT(DISTINCT id) FROM sailthru.message_blast")[0][0] > 10


MESSAGE = ('{ "profile_id" : "%s", "send_time" : "2016-03-31T08:00:03.018", "blast_id" : 6364286, '
           '"message_id" : 4%s }')


@pytest.mark.parametrize("varying_types", [False, True])  # True: pyarrow cannot type the unread key
def test_unread_values_of_message_lines_are_kept_and_nulls_are_not(tmp_path: Path, varying_types: bool) -> None:
    lines = {
        "plain": "",
        "number": ', "x" : 1',
        "null": ', "y" : null',
        "nested": ', "opens" : [ { "ts" : { "$date" : 1459431708000 }, "ip" : "192.0.2.1", "z" : null } ]',
        "own id": ', "id" : "5a1b2c3d4e5f60718293a4b5"',
        **({"text": ', "x" : "one"'} if varying_types else {}),
    }
    export = tmp_path / "export"
    export.mkdir()
    (export / "message_blast.20160401.json").write_text("".join(MESSAGE % kv + "\n" for kv in lines.items()))
    project = Project(tmp_path, export)
    project.write_config(pii="keep")
    assert project.cli("run").exit_code == 0
    got = {p: (json.loads(e) if e else None, i) for p, e, i in project.query(
        "SELECT profile_id, CAST(extra AS VARCHAR), id FROM sailthru.message_blast")}
    assert got.pop("plain") == got.pop("null") == (None, None)
    assert got.pop("own id") == (None, "5a1b2c3d4e5f60718293a4b5")
    assert got.pop("number") == ({"x": 1}, None)
    assert got.pop("nested") == ({"opens": [{"ts": {"$date": 1459431708000}, "ip": "192.0.2.1", "z": None}]}, None)
    assert got == ({"text": ({"x": "one"}, None)} if varying_types else {})


# --- records, not lines -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    b'{"id": 1}\n{"id": 2}\n',
    b'{"id": 1}\n{"id": 2}\n\n',  # a blank line at the end
    b'{"id": 1}\n\n\n{"id": 2}\n   \n\t\n',  # blank and whitespace-only lines inside
    b'\n{"id": 1}\r\n\r\n{"id": 2}\r\n',  # CRLF, a blank first line
    b'{"id": 1}\n{"id": 2}',  # no final newline
    b'',
])
@pytest.mark.parametrize("size", [3, 7, 1 << 20])  # chunk sizes that split lines and newlines
def test_records_are_counted_not_lines(text: bytes, size: int) -> None:
    from floe.sources.sailthru.files import count_records

    records, total = count_records(io.BytesIO(text), size)
    assert (records, total) == (sum(1 for line in text.split(b"\n") if line.strip()), len(text))


def test_the_exports_table_counts_the_records_each_file_loaded(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    files = {"blast.20160401.json": b'{ "id" : 1, "name" : "a", "day" : "2016-03-31" }\n\n',
             "blast.20160402.json": b'\n{ "id" : 2, "name" : "b", "day" : "2016-04-01" }\r\n\r\n'
                                    b'{ "id" : 3, "name" : "c", "day" : "2016-04-01" }\r\n  \n',
             "blast.20160403.json.gz": gzip.compress(b'{ "id" : 4, "name" : "d", "day" : "2016-04-02" }\n\n\n')}
    for name, data in files.items():
        (export / name).write_bytes(data)
    project = Project(tmp_path, export)
    project.write_config()
    assert project.cli("run").exit_code == 0
    counted = dict(project.query("SELECT name, rows FROM sailthru.exports"))
    assert counted == {"blast.20160401.json": 1, "blast.20160402.json": 2, "blast.20160403.json.gz": 1}
    assert sum(counted.values()) == project.query("SELECT COUNT(*) FROM sailthru.blast")[0][0]


# --- a value that does not fit its column ------------------------------------------------------------

TEMPLATES = {
    "blast": '{ "name" : "Campaign %d", "day" : "2016-03-31", "id" : %d }',
    "message_blast": '{ "profile_id" : "p%05d", "send_time" : "2016-03-31T08:00:03.018", "opens" : '
                     '[ { "ts" : { "$date" : 1459431708000 } } ], "blast_id" : 6364286, "message_id" : %d, '
                     '"device" : "Firefox", "message_revenue" : null, "delivery_status" : null }',
    "message_transactional": '{ "profile_id" : "p%05d", "template" : "X BX Welcome", "send_time" : '
                             '"2016-03-31T00:00:12.686", "clicks" : [], "opens" : [ { "ts" : { "$date" : '
                             '1459431708000 } } ], "device" : null, "id" : "t%d" }',
    "profile": '{ "id" : "p%05d", "lists_signup" : { "Daily" : "2015-01-02T03:04:05" }, "total_opens" : %d, '
               '"signup_time" : "2015-01-02T03:04:05.123" }',
}


@pytest.mark.parametrize(("collection", "old", "new", "expected"), [
    ("message_blast", '"blast_id" : 6364286', '"blast_id" : "6364286x"', "field blast_id: expected number, got string"),
    ("message_blast", '"message_id" : ', '"message_id" : 2.5, "x" : ', "field message_id: expected int64, got 2.5"),
    ("message_transactional", '{ "$date" : 1459431708000 }', "5", "field opens[].ts: expected object, got number"),
    ("message_blast", '"message_revenue" : null', '"message_revenue" : 0.1234567',
     "field message_revenue: Failed to convert JSON to decimal128(18, 6): 0.1234567 requires scale 7"),
    ("blast", '"id" : ', '"id" : "x", "y" : ', "field id: Could not convert 'x'"),
    ("profile", '"total_opens" : ', '"total_opens" : "many", "t" : ', "field total_opens: Could not convert 'many'"),
    ("profile", '"Daily" : "2015-01-02T03:04:05"', '"Daily" : "soon"', "field signup_time: Failed to parse string: 'soon'"),
])
@pytest.mark.parametrize(("lines", "bad"), [(89, 45), (3000, 2500)])  # one chunk; many chunks and batches
def test_a_value_that_does_not_fit_names_the_file_and_the_line_as_counted(
    tmp_path: Path, collection: str, old: str, new: str, expected: str, lines: int, bad: int
) -> None:
    export = tmp_path / "export"
    export.mkdir()
    text = [TEMPLATES[collection] % (n, n) for n in range(1, lines + 1)]
    text[2] = text[19] = ""  # blank lines: pyarrow's row numbers skip them, people's line numbers do not
    assert old in text[bad - 1]
    text[bad - 1] = text[bad - 1].replace(old, new, 1)
    name = f"{collection}.20160401.json"
    (export / name).write_text("\n".join(text) + "\n")
    project = Project(tmp_path, export)
    project.write_config(extra="    block_bytes: 65536\n    profile_lines: 100")
    result = project.cli("run")
    assert result.exit_code != 0
    output = result.output + result.stderr
    assert f"{name}:{bad}: {expected}" in output, output
    assert " row " not in output.split(f"{name}:{bad}:")[1].splitlines()[0]


# --- idempotence and updates ----------------------------------------------------------------------

def test_running_twice_leaves_every_table_identical(sailthru_project: Factory) -> None:
    project = sailthru_project(days=3, gzip=True, client_id="4484")
    assert project.cli("run").exit_code == 0
    first = project.snapshot(volatile=set())  # load ids included: nothing may even be rewritten
    assert all(first[t] for t in TABLES)
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    assert project.snapshot(volatile=set()) == first


def test_update_file_adds_new_activity_without_duplicates(sailthru_project: Factory, tmp_path: Path) -> None:
    project = sailthru_project(days=3)
    project.write_config(pii="keep")  # compare click URLs verbatim
    update = project.export / "message_blast_update.20160403.json"
    held_back = tmp_path / update.name
    shutil.move(update, held_back)
    assert project.cli("run").exit_code == 0
    before = project.snapshot()
    keys_before = set(table_keys(project))

    shutil.move(held_back, update)
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    after = project.snapshot()

    loaded = sorted(p for p in project.export.iterdir() if "message_blast" in p.name)
    keys = table_keys(project)
    assert len(keys) == len(set(keys)), "duplicate message_blast rows"
    assert set(keys) == message_keys(loaded)
    added = set(keys) - keys_before
    assert added and added <= message_keys([update]), "only the update's new activity is added"
    # A message that gained its first actions loses its NULL-action row; every other row stays.
    gone = keys_before - set(keys)
    assert gone and all(k[2] is None and (k[0], k[1]) in {(a[0], a[1]) for a in added} for k in gone)
    messages = {}
    for p, b, action, *_ in keys:
        messages.setdefault((p, b), set()).add(action)
    assert not any(None in actions and len(actions) > 1 for actions in messages.values())
    assert len(after["exports"]) == len(before["exports"]) + 1
    for table in set(TABLES) - {"message_blast", "exports"}:
        assert after[table] == before[table], table


def test_resent_profile_replaces_its_child_rows(sailthru_project: Factory) -> None:
    project = sailthru_project(days=3)
    assert project.cli("run").exit_code == 0
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted(project.export.glob("profile.*.json")):  # later files win
        for line in path.read_bytes().splitlines():
            doc = orjson.loads(line)
            latest[doc["id"]] = doc
    resent = {doc["id"] for doc in latest.values() if "last_active_day" in doc["vars"]}
    assert resent, "the generator re-sends active profiles with changed vars"
    got: dict[str, set[str]] = {}
    for pid, var in project.query("SELECT id, var FROM sailthru.profile_vars"):
        got.setdefault(pid, set()).add(var)
    assert got == {pid: set(doc["vars"]) for pid, doc in latest.items() if doc["vars"]}
    assert all("var_0" not in got[pid] for pid in resent)  # a var removed upstream is gone here too

    # A later export re-sends one profile with an empty vars map and no browser map: its rows go.
    emptied = next(pid for pid, doc in latest.items() if doc["vars"] and doc.get("browser") and doc.get("geo"))
    later = max(project.export.glob("profile.*.json")).with_name("profile.20991231.json")
    later.write_bytes(orjson.dumps({**latest[emptied], "vars": {}, "browser": None}) + b"\n")
    before = {t: project.query(f"SELECT count(*) FROM sailthru.{t} WHERE id <> ?", (emptied,))
              for t in ("profile_vars", "profile_browser", "profile_geo")}
    assert project.cli("run").exit_code == 0
    for table in ("profile_vars", "profile_browser"):
        assert project.query(f"SELECT count(*) FROM sailthru.{table} WHERE id = ?", (emptied,)) == [(0,)], table
    assert project.query("SELECT count(*) FROM sailthru.profile_geo WHERE id = ?", (emptied,)) != [(0,)]
    for table, count in before.items():  # other profiles keep theirs; no marker row is stored
        assert project.query(f"SELECT count(*) FROM sailthru.{table} WHERE id <> ?", (emptied,)) == count, table
    for table in ("profile_vars", "profile_browser", "profile_geo", "profile_lists_signup"):
        key = {"profile_vars": "var", "profile_browser": "browser", "profile_geo": "label",
               "profile_lists_signup": "list"}[table]
        assert project.query(f"SELECT count(*) FROM sailthru.{table} WHERE {key} IS NULL") == [(0,)], table


# --- exactly once under SIGKILL -----------------------------------------------------------------------

def test_sigkill_during_loads_then_rerun_matches_a_clean_run(sailthru_project: Factory, tmp_path: Path) -> None:
    clean = sailthru_project(profiles=150, days=6, blasts_per_day=3, gzip=True)
    assert clean.cli("run").exit_code == 0
    expected = clean.snapshot()
    expected_loads = clean.query("SELECT count(*) FROM _floe_loads WHERE status = 'committed'")[0][0]

    crashed = Project(tmp_path / "crashed", clean.export)
    crashed.root.mkdir()
    crashed.write_config()
    # Each run is SIGKILLed at a named point (floe.infra.killpoints): while staging, inside a commit, right after one.
    commits = []
    for point in ("batch:1", "before-commit:1", "after-commit:1", "before-commit:2", "after-commit:2", "batch:3"):
        child = crashed.popen("run", env={KILL_AT: point})
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, (point, err.decode())
        commits.append(committed_loads(crashed))
    assert commits[:5] == [0, 0, 1, 2, 4] and 4 <= commits[5] < expected_loads, commits
    for staged in staged_files(crashed.stage):  # left behind by the kills: no address inside
        try:
            rows = read_staged(staged).to_pylist()
        except pa.ArrowInvalid:  # killed while writing it: not a complete file
            continue
        assert not EMAIL.search(str(rows))

    final = crashed.popen("run")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    assert crashed.snapshot() == expected
    assert crashed.query("SELECT count(*) FROM _floe_loads WHERE status = 'committed'")[0][0] == expected_loads


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("collection", ["message_blast", "profile"])
def test_malformed_line_names_file_and_line_and_commits_nothing_of_that_file(
    sailthru_project: Factory, collection: str
) -> None:
    project = sailthru_project(days=2, profiles=200)
    project.write_config(extra="    block_bytes: 65536\n    profile_lines: 20")  # several batches per file
    bad = project.export / f"{collection}.20160402.json"
    lines = bad.read_text().splitlines()
    number = len(lines) - 1  # batches before it are staged, then it fails
    lines[number - 1] = '{ "profile_id" : "abc", "email" : "reader.9@example.com" '
    bad.write_text("\n".join(lines) + "\n")

    result = project.cli("run")
    assert result.exit_code != 0
    assert f"{bad.name}:{number}: not valid JSON" in result.output + result.stderr
    assert not EMAIL.search(result.output + result.stderr)
    assert committed_files(project, collection) == {f"{collection}.20160401.json"}
    day_one = project.query(f"SELECT count(DISTINCT _floe_load_id) FROM sailthru.{collection}")[0][0]
    assert day_one == 1, "only the first file's commit is in the table"
    if collection == "message_blast":  # (URLs compared without their hashed addresses)
        assert {k[:4] for k in table_keys(project)} == {
            k[:4] for k in message_keys([project.export / "message_blast.20160401.json"])}
    failed = project.query("SELECT stream, error FROM _floe_loads WHERE status = 'failed'")
    readers = {"message_blast"} if collection == "message_blast" else {
        "profile", "profile_geo", "profile_browser", "profile_lists_signup", "profile_vars"}
    assert {s for s, _ in failed} == readers  # every stream reading that file stops at it
    assert all(f"{bad.name}:{number}" in e for _, e in failed)


def test_bad_value_error_does_not_echo_an_address(sailthru_project: Factory) -> None:
    project = sailthru_project(days=1)
    bad = project.export / "profile.20160401.json"
    doc = orjson.loads(bad.read_bytes().splitlines()[0])
    doc["signup_time"] = "reader.77@example.com"
    bad.write_bytes(orjson.dumps(doc) + b"\n")
    result = project.cli("run")
    assert result.exit_code != 0
    text = result.output + result.stderr
    assert "profile.20160401.json" in text and "signup_time" in text
    assert not EMAIL.search(text)


def test_zip_with_macos_junk_and_unknown_collection(sailthru_project: Factory) -> None:
    project = sailthru_project(days=2, gzip=True, client_id="4484", zip_name="export.zip")
    archive = project.export / "export.zip"
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("4484_purchase_log.20160401.json", '{ "x" : 1 }\n')
        z.writestr(".DS_Store", b"\x00")
    project.write_config()
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    assert "__MACOSX/._4484_blast.20160401.json.gz" in result.stderr
    assert '4484_purchase_log.20160401.json reason="unknown collection or name"' in result.stderr  # logfmt quotes
    assert ".DS_Store" in result.stderr
    names = {r[0] for r in project.query("SELECT name FROM sailthru.exports")}
    assert "export.zip/4484_blast.20160401.json.gz" in names and len(names) == 9
    assert not any("MACOSX" in n or "purchase" in n for n in names)
    assert project.query("SELECT count(*) FROM sailthru.message_blast")[0][0] > 0


def test_changed_file_is_an_error_unless_reprocess(sailthru_project: Factory) -> None:
    project = sailthru_project(days=2)
    assert project.cli("run").exit_code == 0
    path = project.export / "blast.20160401.json"
    first = orjson.loads(path.read_bytes().splitlines()[0])
    path.write_text(path.read_text().replace(first["name"], "Renamed campaign"))

    result = project.cli("run")
    assert result.exit_code != 0
    assert "blast.20160401.json: changed since it was loaded" in result.output + result.stderr
    assert "--reprocess" in result.output + result.stderr
    assert project.query("SELECT name FROM sailthru.blast WHERE id = ?", (first["id"],)) == [(first["name"],)]

    result = project.cli("run", "--reprocess")
    assert result.exit_code == 0, result.output
    assert project.query("SELECT name FROM sailthru.blast WHERE id = ?", (first["id"],)) == [("Renamed campaign",)]


# --- PII --------------------------------------------------------------------------------------------

def all_text(project: Project) -> str:
    """Every value of every table in the warehouse (floe's own tables included), as one text."""
    parts = []
    tables = project.query("SELECT table_schema, table_name FROM information_schema.tables")
    for schema, table in tables:
        parts.append(repr(project.query(f'SELECT * FROM "{schema}"."{table}"')))
    return "\n".join(parts)


@pytest.mark.parametrize("pii", ["hash", "drop", "keep"])
def test_email_addresses_follow_the_pii_setting(sailthru_project: Factory, pii: str) -> None:
    project = sailthru_project(days=3, profiles=80)
    project.write_config(pii=pii)
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    text = all_text(project)
    logs = result.output + result.stderr
    columns = {r[0] for r in project.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'profile'")}
    emails = set(EMAIL.findall(text))
    if pii == "keep":
        assert "reader.0@example.com" in text and "alt.0@example.org" in text and "%40example.com" in text
        assert "email" in columns
        return
    assert not emails and not EMAIL.search(logs)
    assert "email" not in columns
    urls = project.query("SELECT count(*) FROM sailthru.message_blast WHERE action_url LIKE '%email=%'")[0][0]
    assert urls > 0, "the generator puts addresses into some click URLs"
    if pii == "hash":
        digest = hashlib.sha256((SALT + "reader.0@example.com").encode()).hexdigest()
        assert project.query("SELECT count(*) FROM sailthru.profile WHERE email_hash = ?", (digest,)) == [(1,)]
        alt = hashlib.sha256((SALT + "alt.0@example.org").encode()).hexdigest()
        assert project.query("SELECT count(*) FROM sailthru.profile_vars WHERE value = ?", (alt,)) == [(1,)]
    else:
        assert "email_hash" not in columns
    assert SALT not in text + logs


def test_stage_files_hold_no_address(sailthru_project: Factory, tmp_path: Path) -> None:
    """What the engine stages is what the streams yield: write it the way the engine does and look."""
    import asyncio

    from floe.config import load_config
    from floe.engine.factory import context_for, make_source
    from floe.infra.stage import StageWriter

    project = sailthru_project(days=2, profiles=60)
    config = load_config(project.root / "floe.yml")
    source = make_source(config, "sailthru", context_for(config))
    files = []

    async def stage_all() -> None:
        for stream in source.streams():
            writer = StageWriter(tmp_path / "stage-check" / stream.name, "t")
            async for batch in stream.read(None):
                if batch.records is not None:
                    writer.write(batch.records)
            files.extend(writer.flush())

    asyncio.run(stage_all())
    assert len(files) >= 9
    text = "\n".join(str(pq.read_table(f.path).to_pylist()) for f in files)
    assert "email=" in text and not EMAIL.search(text)


def test_warehouse_file_named_like_the_source(sailthru_project: Factory) -> None:
    """sailthru.duckdb holds a catalog named `sailthru` next to the schema `sailthru`: loads still work."""
    project = sailthru_project(days=1)
    config = project.root / "floe.yml"
    config.write_text(config.read_text().replace(str(project.db), str(project.root / "sailthru.duckdb")))
    for _ in range(2):  # the second run finds the schema existing (that is where it was ambiguous)
        result = project.cli("run")
        assert result.exit_code == 0, result.output
    project.export.joinpath("blast.20160402.json").write_text('{ "name" : "late", "day" : "2016-04-01", "id" : 1 }\n')
    assert project.cli("run").exit_code == 0


def test_client_id_keeps_that_clients_files_and_unprefixed_ones(tmp_path: Path) -> None:
    from floe.sources.sailthru.files import discover

    for name in ("4484_blast.20160401.json", "9999_blast.20160401.json", "blast.20160402.json",
                 "4484_blast.json", "notes.txt"):
        (tmp_path / name).write_text('{ "id" : 1, "name" : "x", "day" : "2016-03-31" }\n')
    assert [f.name for f in discover(tmp_path, "4484")] == [
        "4484_blast.json", "4484_blast.20160401.json", "blast.20160402.json"]  # one-time export first
    assert len(discover(tmp_path)) == 4


def test_message_revenue_is_an_exact_decimal_summing_to_the_exported_amounts(sailthru_project: Factory) -> None:
    project = sailthru_project(days=2, profiles=60)
    result = project.cli("run")
    assert result.exit_code == 0, result.output
    exported: dict[tuple[Any, ...], Decimal] = {}
    for path in sorted(project.export.glob("message_blast*.json"), key=lambda p: (p.name.split(".")[1], p.name)):
        for doc in map(orjson.loads, path.read_bytes().splitlines()):
            if doc.get("message_revenue") is not None:  # numbers and numeric strings; a later file wins
                exported[(doc["profile_id"], doc["blast_id"])] = Decimal(str(doc["message_revenue"]))
    assert {type(v) for v in emulator.REVENUES} == {float, int, str} and len(exported) > 5
    assert project.query("SELECT data_type FROM information_schema.columns WHERE table_schema = 'sailthru' "
                         "AND table_name = 'message_blast' AND column_name = 'message_revenue'") == [("DECIMAL(18,6)",)]
    per_message = "SELECT DISTINCT profile_id, blast_id, message_revenue FROM sailthru.message_blast"
    assert project.query(f"SELECT sum(message_revenue) FROM ({per_message})") == [(sum(exported.values()),)]
