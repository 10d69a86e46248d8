"""Column type changes: what a load does when staged values do not fit the table's columns as they are.

`plan_schema` judges every staged column against the table (`column_types.compare`) and decides, by the
stream's `TableSpec.schema_changes`:

* `evolve` (the default): new columns are added; a column whose new values some wider type holds exactly
  is widened to it (INTEGER -> DECIMAL(12,2), DATE -> TIMESTAMPTZ), if the warehouse can change the
  column to that type (`Widening`, per-warehouse data) and, for a text type, only with `widen_to_text`;
  values no widening holds go to a variant column `<column>__v_<type>` (dlt's naming), created with the
  type the warehouse gives those values, and the column itself reads NULL for those rows. A key column
  never moves to a variant: such a change fails.
* `freeze`: any new column or type change fails the load with one line naming the column and both types.

The plan is data (`SchemaPlan`): the columns to add and widen, the staged columns each file sends to a
variant column, the refusals. `ensure_sql_table` applies it inside the load's transaction (DuckDB,
PostgreSQL, Redshift: a failed load keeps the old column types); `routed` gives the job whose staged
files and spec name the variant columns. Each applied change is kept in `_floe_loads.details`
("schema_changes"), logged once committed (`log_changes`) and sent to `notify:` by the run.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from floe.core.destination import LoadJob, StagedFile, TableSpec
from floe.core.errors import DestinationError
from floe.destinations.column_types import ColumnRules, SqlType, compare, type_key
from floe.infra.stage import SUFFIXES

if TYPE_CHECKING:
    import pyarrow as pa

    from floe.destinations.sql import SqlDestination

log = logging.getLogger("floe.schema")
# A variant column's name ends in the kind of values it holds, in dlt's words.
VARIANT_KINDS = {
    "bool": "bool", "int32": "bigint", "int64": "bigint", "float64": "double", "decimal": "decimal",
    "string": "text", "json": "json", "nested": "json", "binary": "binary", "date": "date", "time": "time",
    "timestamp": "timestamp", "timestamp_tz": "timestamp",
}
WIDENING_SUFFIX = "__floe_widen"  # the new column of a widening by copy, renamed at once


def variant_name(column: str, f: pa.Field) -> str:
    return f"{column}__v_{VARIANT_KINDS.get(type_key(f), 'text')}"


def staged_name(f: pa.Field) -> str:
    return "JSON text" if type_key(f) == "json" else str(f.type)


@dataclass(frozen=True)
class Widening:
    """How one warehouse changes a column's type, as data.

    `alter`: the statement ({table}, {column}, {type}); None: a new column, a copy of the values, the old
    column dropped and the new one renamed (Redshift changes no type but VARCHAR's length in place).
    `becomes`: the base types each base type may be changed to (None: any type that holds its values)."""

    alter: str | None = "ALTER TABLE {table} ALTER COLUMN {column} TYPE {type}"
    becomes: Mapping[str, frozenset[str]] | None = None

    def allows(self, old: SqlType, new: SqlType) -> bool:
        return self.becomes is None or new.name in self.becomes.get(old.name, frozenset())

    def statements(self, table: str, column: str, new_type: str, copy: str) -> list[str]:
        """The statements widening `column` (quoted) of `table` to `new_type`; `copy`: a free column name."""
        if self.alter is not None:
            return [self.alter.format(table=table, column=column, type=new_type)]
        return [f"ALTER TABLE {table} ADD COLUMN {copy} {new_type}",
                f"UPDATE {table} SET {copy} = CAST({column} AS {new_type})",
                f"ALTER TABLE {table} DROP COLUMN {column}",
                f"ALTER TABLE {table} RENAME COLUMN {copy} TO {column}"]


@dataclass(frozen=True)
class Change:
    """One change a load makes to a table: a column added, widened, or a variant column taking values."""

    kind: Literal["add", "widen", "variant"]
    column: str
    old: str | None  # the column's type before (a variant: the type of the column it stands beside)
    new: str
    of: str | None = None  # a variant: the column whose values it takes

    def describe(self) -> str:
        if self.kind == "add":
            return f"added column {self.column!r} {self.new}"
        if self.kind == "widen":
            return f"widened column {self.column!r} from {self.old} to {self.new}"
        return f"values of column {self.of!r} ({self.old}) that it cannot hold go to new column {self.column!r} {self.new}"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class SchemaPlan:
    """What a load changes in its table (see the module docstring)."""

    changes: list[Change] = field(default_factory=list)
    widen: dict[str, str] = field(default_factory=dict)  # column -> its new type
    renames: list[dict[str, str]] = field(default_factory=list)  # per staged file: column -> variant column
    dropped: set[str] = field(default_factory=set)  # spec columns whose declared type no longer loads as is
    refusals: list[str] = field(default_factory=list)

    @property
    def reshaped(self) -> bool:
        """Whether the job's staged files or spec must name other columns (`routed`)."""
        return bool(self.dropped) or any(self.renames)

    def spec(self, spec: TableSpec, staged: Sequence[pa.Schema]) -> TableSpec:
        """`spec` with each staged column under the name it loads into (as `table_spec` builds it)."""
        import pyarrow as pa

        if not self.reshaped:
            return spec
        fields = {f.name: f for f in spec.columns if f.name not in self.dropped}
        for schema, renames in zip(staged, self.renames, strict=True):
            for f in schema:
                name = renames.get(f.name, f.name)
                if name == f.name and f.name not in self.dropped or pa.types.is_null(f.type) and name in fields:
                    continue
                fields[name] = f.with_name(name)
        return dataclasses.replace(spec, columns=pa.schema(list(fields.values())))


def plan_schema(rules: ColumnRules, widening: Widening, spec: TableSpec, existing: Mapping[str, str],
                staged: Sequence[pa.Schema], create: Callable[[pa.Field], str | None]) -> SchemaPlan:
    """The changes loading `staged` files of `spec` into a table with columns `existing` (none: no table
    yet) makes; refusals instead, by `spec.schema_changes` (see the module docstring)."""
    import pyarrow as pa

    plan = SchemaPlan(renames=[{} for _ in staged])
    frozen = spec.schema_changes == "freeze"
    columns = {f.name: t for f in spec.columns if (t := create(f)) is not None} | dict(existing)
    keys = set(spec.primary_key) | set(spec.parent_key)
    declared = {f.name: f for f in spec.columns}
    widened_from: dict[str, str] = {}
    if existing:
        for f in spec.columns:
            if f.name not in existing and (t := create(f)) is not None:
                if frozen:
                    plan.refusals.append(f"column {f.name!r} is new ({t}) and schema_changes is freeze")
                elif (base := f.name.rpartition("__v_")[0]) in existing:  # routed before the transaction
                    plan.changes.append(Change("variant", f.name, str(rules.parse(existing[base])), t, of=base))
                else:
                    plan.changes.append(Change("add", f.name, None, t))

    def widen(name: str, f: pa.Field) -> bool:
        """Widen column `name` to hold `f`'s values if the policy and the warehouse allow it."""
        verdict = compare(rules, columns[name], f, create)
        if verdict.lossless:
            return True
        if frozen or verdict.widen_to is None:
            return False
        old, wider = rules.parse(columns[name]), rules.parse(verdict.widen_to)
        text = rules.parse(create(pa.field("v", pa.string())) or "").name
        if not widening.allows(old, wider) or wider.name == text and not spec.widen_to_text:
            return False
        widened_from.setdefault(name, str(old))
        columns[name] = plan.widen[name] = str(wider)
        return True

    def refuse(f: pa.Field, why: str) -> None:
        column = rules.parse(columns[f.name])
        plan.refusals.append(f"column {f.name!r} is {column} in the warehouse and the new values are "
                             f"{staged_name(f)}{why}")

    def route(f: pa.Field, has_values: bool) -> str | None:
        """Where `f`'s values go: None (the column itself, widened if need be) or a variant column."""
        if widen(f.name, f):
            return None
        if frozen:
            refuse(f, " and schema_changes is freeze")
        elif f.name in keys:
            refuse(f, ", which it cannot hold exactly; it is a key column, so its values cannot go to a variant column")
        elif not has_values:
            plan.dropped.add(f.name)  # declared with that type, no values this load: nothing to keep
        else:
            variant = variant_name(f.name, f)
            if variant not in columns:
                columns[variant] = create(f) or ""
                plan.changes.append(Change("variant", variant, str(rules.parse(columns[f.name])), columns[variant],
                                           of=f.name))
            elif not widen(variant, f):
                refuse(f, f", and its variant column {variant!r} is {columns[variant]}, which cannot hold them either")
            return variant
        return None

    decided: dict[tuple[str, pa.DataType, bool], str | None] = {}
    done: list[tuple[pa.Schema, dict[str, str]]] = []  # files of one schema are routed alike (usually all)
    for schema, renames in [*zip(staged, plan.renames, strict=True), (spec.columns, None)]:
        if renames is not None and (same := next((r for s, r in done if s.equals(schema)), None)) is not None:
            renames.update(same)
            continue
        for f in schema:
            known = declared.get(f.name)
            key = (f.name, f.type, bool(f.metadata or known is not None and known.metadata))
            if key in decided or f.name not in columns or pa.types.is_null(f.type):
                route_to = decided.get(key)
            else:
                if known is not None and known.metadata and not f.metadata:
                    f = f.with_metadata(known.metadata)  # as table_spec does: the declared JSON flag holds
                route_to = decided[key] = route(f, renames is not None)
            if route_to is not None and renames is not None:
                renames[f.name] = route_to
                plan.dropped.add(f.name)
        if renames is not None:
            done.append((schema, renames))
    plan.changes += [Change("widen", name, old, plan.widen[name]) for name, old in widened_from.items()
                     if name in existing]
    return plan


def refusal_error(destination: str, spec: TableSpec, plan: SchemaPlan) -> DestinationError:
    return DestinationError(f"{destination}: loading {spec.schema_name}.{spec.table} failed, nothing committed: "
                            + "; ".join(plan.refusals))


def variant_refresh_error(destination: str, spec: TableSpec) -> DestinationError:
    return DestinationError(
        f"{destination}: replacing {spec.schema_name}.{spec.table} by its full refresh failed, nothing committed: "
        "some refreshed values fit none of the table's columns and a full refresh moves no values to variant "
        "columns; drop the table (or the changed columns) and run the full refresh again")


def ensure_sql_table(dest: SqlDestination, cur: Any, spec: TableSpec, staged: Sequence[StagedFile]) -> SchemaPlan:
    """Create or evolve the table in the caller's transaction by the plan; raise its refusals."""
    existing = dest.existing_columns(cur, spec.schema_name, spec.table)
    schemas = [f.schema for f in staged]
    plan = plan_schema(dest.column_rules, dest.widening, spec, existing, schemas, dest.column_type)
    if plan.refusals:
        raise refusal_error(dest.name, spec, plan)
    target = plan.spec(spec, schemas)
    if not existing:
        cur.execute(dest.create_table_sql(target))
    else:
        for f in target.columns:
            if f.name not in existing and dest.column_type(f) is not None:
                cur.execute(dest.add_column_sql(target, f))
    if plan.widen:
        table = dest.qualified(spec.schema_name, spec.table)
        for name, _ in spec.views:  # a view would hold on to the column's type (recreated by the load)
            cur.execute(f"DROP VIEW IF EXISTS {dest.qualified(spec.schema_name, name)}")
        for name, new_type in plan.widen.items():
            for statement in dest.widening.statements(table, dest.quote(name), new_type,
                                                      dest.quote(name + WIDENING_SUFFIX)):
                cur.execute(statement)
    return plan


@contextmanager
def routed(job: LoadJob, plan: SchemaPlan) -> Iterator[LoadJob]:
    """`job` with its staged columns under the names they load into (files copied with variant columns
    renamed, removed afterwards); its `details` keep the plan's changes."""
    if plan.changes:
        job.details["schema_changes"] = [c.as_dict() for c in plan.changes]
    else:
        job.details.pop("schema_changes", None)
    if not plan.reshaped:
        yield job
        return
    files: list[StagedFile] = []
    made: list[Path] = []
    try:
        for staged, renames in zip(job.files, plan.renames, strict=True):
            if renames:
                staged = rename_columns(staged, renames)
                made.append(staged.path)
            files.append(staged)
        yield dataclasses.replace(job, table=plan.spec(job.table, [f.schema for f in job.files]), files=files)
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def rename_columns(staged: StagedFile, renames: Mapping[str, str]) -> StagedFile:
    """A copy of a stage file (beside it, same format) with columns renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A name of its own: with several destinations, each routes the same shared stage file at once.
    path = staged.path.with_name(f"{staged.path.stem}-routed-{secrets.token_hex(4)}{staged.path.suffix}")
    if staged.path.suffix == SUFFIXES["arrow"]:
        with pa.OSFile(str(staged.path)) as source:
            table = pa.ipc.open_file(source).read_all()
    else:
        table = pq.read_table(staged.path)
    schema = pa.schema([f.with_name(renames.get(f.name, f.name)) for f in table.schema])
    table = pa.Table.from_arrays(table.columns, schema=schema)
    if staged.path.suffix == SUFFIXES["arrow"]:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, path)
    return StagedFile(path, staged.rows, schema)


def log_changes(destination: str, job: LoadJob) -> None:
    """One line per committed change of the job's table."""
    for change in job.details.get("schema_changes", []):
        log.warning("event=schema_change destination=%s table=%s.%s kind=%s column=%s old=%s new=%s",
                    destination, job.table.schema_name, job.table.table, change["kind"], change["column"],
                    change.get("old"), change["new"])
