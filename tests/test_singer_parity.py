"""`floe tap sailthru | floe target duckdb` makes the same tables as `floe run`: the tap's SCHEMA
extension (`"floe": {"parent_key": ..., "decimals": ...}`, docs/singer.md) lets floe's target replace
a re-sent message's rows as a set and keep amounts as the same exact decimals."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from floe.apps.singer.messages import Extension, read_extension
from floe.apps.singer.schema import json_schema_to_arrow
from floe.core.errors import SourceError
from tests.fixtures.sailthru import FLOE, VOLATILE, Project


def test_tap_into_target_gives_the_tables_floe_run_gives(sailthru_project: Any, tmp_path: Path) -> None:
    direct = sailthru_project(days=3, profiles=60, updates=True)
    result = direct.cli("run")
    assert result.exit_code == 0, result.output
    piped = Project(tmp_path / "singer", direct.export)
    piped.root.mkdir()
    piped.write_config()
    with (tmp_path / "tap.err").open("wb") as err:
        tap = subprocess.Popen([str(FLOE), "tap", "sailthru", "-c", str(direct.root / "floe.yml")],
                               stdout=subprocess.PIPE, stderr=err, cwd=direct.root)
        target = subprocess.run([str(FLOE), "target", "warehouse", "-c", str(piped.root / "floe.yml"),
                                 "--schema", "sailthru"], stdin=tap.stdout, capture_output=True, cwd=piped.root,
                                timeout=120, check=False)
        assert tap.stdout is not None
        tap.stdout.close()
        assert tap.wait(timeout=60) == 0, (tmp_path / "tap.err").read_text()[-2000:]
    assert target.returncode == 0, target.stderr.decode()[-2000:]
    assert orjson.loads(target.stdout.splitlines()[-1])["bookmarks"]  # the last STATE, once committed

    volatile = VOLATILE | {"_sdc_table_version"}
    want, got = direct.snapshot(volatile), piped.snapshot(volatile)
    resent = direct.query("SELECT count(*) FROM sailthru.message_blast WHERE action_name IS NULL")[0][0]
    assert resent > 0 and len(want["message_blast"]) > 100  # messages without actions yet, some sent again
    assert {t: len(rows) for t, rows in got.items()} == {t: len(rows) for t, rows in want.items()}
    for table in want:
        assert got[table] == want[table], table
    types = "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'message_blast' " \
            "AND column_name = 'message_revenue'"
    assert piped.query(types) == direct.query(types) == [("message_revenue", "DECIMAL(18,6)")]


def test_the_extension_is_read_strictly_and_absent_means_plain_singer() -> None:
    keys = ["profile_id", "blast_id", "action_ts"]
    message = {"type": "SCHEMA", "stream": "message_blast",
               "floe": {"parent_key": ["profile_id", "blast_id"], "parent_markers": False,
                        "decimals": {"message_revenue": [18, 6]}}}
    assert read_extension(message, keys, "input line 1") == Extension(
        ("profile_id", "blast_id"), False, {"message_revenue": (18, 6)})
    assert read_extension({"type": "SCHEMA", "stream": "s"}, keys, "input line 1") == Extension()
    for bad in ({"parent_key": ["nope"]}, {"decimals": {"x": [6, 18]}}, {"parent_keys": ["profile_id"]}, "yes"):
        with pytest.raises(SourceError, match=r'input line 3: stream message_blast: "floe" must be like'):
            read_extension({**message, "floe": bad}, keys, "input line 3")


def test_a_number_with_a_decimal_multiple_of_is_an_exact_decimal_column() -> None:
    schema = {"properties": {"a": {"type": ["number", "null"], "multipleOf": 0.01}, "b": {"type": "number"},
                             "c": {"type": "number", "multipleOf": 0.5}, "d": {"type": "number", "multipleOf": 1}}}
    back = json_schema_to_arrow(schema)
    assert [back.field(n).type for n in "abcd"] == [pa.decimal128(38, 2), pa.float64(), pa.float64(),
                                                     pa.decimal128(38, 0)]
