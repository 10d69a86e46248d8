"""Amounts of money load as exact decimals (MONEY, DECIMAL(18,6)) and sum exactly; tables made before
(a text `price`, a double `adn_cost`) keep loading, as docs/types.md says, and its conversion
statements turn them into decimal columns that later loads fill."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from floe.core.destination import LoadJob, TableSpec
from floe.core.errors import SourceError
from floe.core.stream import MONEY
from floe.destinations.sql import SqlDestination
from floe.infra.stage import StageWriter, new_load_id
from floe.sources.twilio_records import to_money
from tests.test_destinations import make_destination, settings_for

# The conversion statements of docs/types.md ("A table whose amount column is text or double"), per warehouse.
CONVERT_TEXT = {
    "duckdb": ["ALTER TABLE src.calls ALTER price TYPE DECIMAL(18,6) USING CAST(NULLIF(price, '') AS DECIMAL(18,6))"],
    "postgres": ["ALTER TABLE src.calls ALTER COLUMN price TYPE NUMERIC(18,6) USING NULLIF(price, '')::NUMERIC(18,6)"],
}
CONVERT_DOUBLE = {
    "duckdb": ["ALTER TABLE src.stats ALTER adn_cost TYPE DECIMAL(18,6) "
               "USING coalesce(adn_cost__v_decimal, CAST(adn_cost AS DECIMAL(18,6)))",
               "ALTER TABLE src.stats DROP COLUMN adn_cost__v_decimal"],
    "postgres": ["ALTER TABLE src.stats ALTER COLUMN adn_cost TYPE NUMERIC(18,6) "
                 "USING coalesce(adn_cost__v_decimal, adn_cost::NUMERIC(18,6))",
                 "ALTER TABLE src.stats DROP COLUMN adn_cost__v_decimal"],
}


@pytest.fixture(params=["duckdb", "postgres"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    destination = make_destination(settings_for(request.param, tmp_path, request), tmp_path)
    yield destination
    destination.close()


def kind_of(dest: SqlDestination) -> str:
    return "duckdb" if dest.config.type == "duckdb" else "postgres"


def load(dest: SqlDestination, folder: Path, table: str, column: str, ids: list[int], values: pa.Array) -> LoadJob:
    """Commit (id, <column>) rows to src.<table> as the pipeline does; the job (its details) is returned."""
    batch = pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), values],
                                       schema=pa.schema([pa.field("id", pa.int64()), pa.field(column, values.type)]))
    writer = StageWriter(folder / table, new_load_id(), format=dest.stage_format("merge"))
    writer.write(batch)
    job = LoadJob(writer.load_id, "src", table, TableSpec("src", table, batch.schema, primary_key=("id",),
                                                          disposition="merge"),
                  writer.flush(), {"ids": ids}, datetime.now(UTC))
    dest.load(job)
    return job


def column_type(dest: SqlDestination, table: str, column: str) -> str:
    with dest.transaction() as cur:
        return str(dest.existing_columns(cur, "src", table).get(column))


def execute(dest: SqlDestination, statements: list[str]) -> None:
    with dest.transaction() as cur:
        for statement in statements:
            cur.execute(statement)


def money(*values: str | None) -> pa.Array:
    return pa.array([None if v is None else Decimal(v) for v in values], MONEY)


def test_money_lands_as_an_exact_decimal_and_sums_exactly(dest: SqlDestination, tmp_path: Path) -> None:
    load(dest, tmp_path, "calls", "price", [1, 2, 3, 4, 5], money("-0.00750", "0.1", "0.2", None, "123456789012.123456"))
    assert column_type(dest, "calls", "price").upper().replace("NUMERIC", "DECIMAL") == "DECIMAL(18,6)"
    assert dest.query("SELECT sum(price) FROM src.calls WHERE id < 4") == [(Decimal("0.29250"),)]
    assert dest.query("SELECT price FROM src.calls WHERE id = 5") == [(Decimal("123456789012.123456"),)]


def test_twilio_prices_convert_exactly_or_fail_naming_the_value() -> None:
    assert to_money(pa.array(["-0.00750", " 0.04 ", "", None, "12"]), "price").to_pylist() == [
        Decimal("-0.0075"), Decimal("0.04"), None, None, Decimal(12)]
    with pytest.raises(SourceError, match=r"Twilio field price: '-0.0012345' is not an amount floe can keep exactly "
                                          r"\(at most 12 integer digits and 6 decimal places\)"):
        to_money(pa.array(["-0.1", "-0.0012345"]), "price")
    with pytest.raises(SourceError, match="Twilio field base_price: 'free' is not an amount"):
        to_money(pa.array(["free"]), "base_price")


def test_an_earlier_text_price_column_keeps_loading_and_converts_with_the_documented_statement(
        dest: SqlDestination, tmp_path: Path) -> None:
    load(dest, tmp_path, "calls", "price", [1, 2], pa.array(["-0.00750", ""]))  # as floe stored it before
    job = load(dest, tmp_path, "calls", "price", [3, 4], money("-0.0125", None))
    # A text column holds the new values exactly as text: the load commits, the column stays text.
    assert "schema_changes" not in job.details
    assert column_type(dest, "calls", "price") .upper() in ("VARCHAR", "TEXT")
    assert [Decimal(v) for (v,) in dest.query("SELECT price FROM src.calls WHERE id = 3")] == [Decimal("-0.0125")]
    execute(dest, CONVERT_TEXT[kind_of(dest)])
    load(dest, tmp_path, "calls", "price", [5], money("-0.2"))
    assert column_type(dest, "calls", "price").upper().replace("NUMERIC", "DECIMAL") == "DECIMAL(18,6)"
    assert dest.query("SELECT sum(price), count(price) FROM src.calls") == [(Decimal("-0.22"), 3)]


def test_an_earlier_double_cost_column_sends_new_values_to_a_variant_until_converted(
        dest: SqlDestination, tmp_path: Path) -> None:
    load(dest, tmp_path, "stats", "adn_cost", [1, 2], pa.array([0.1, 0.2]))  # as floe stored it before
    job = load(dest, tmp_path, "stats", "adn_cost", [3], money("0.12"))
    # No double holds every DECIMAL(18,6) exactly: the new values go to the variant column beside it.
    assert [c["kind"] for c in job.details["schema_changes"]] == ["variant"]
    assert dest.query("SELECT adn_cost, adn_cost__v_decimal FROM src.stats WHERE id = 3") == [(None, Decimal("0.12"))]
    execute(dest, CONVERT_DOUBLE[kind_of(dest)])
    job = load(dest, tmp_path, "stats", "adn_cost", [4], money("0.3"))
    assert "schema_changes" not in job.details
    assert dest.query("SELECT sum(adn_cost), count(adn_cost) FROM src.stats") == [(Decimal("0.72"), 4)]
