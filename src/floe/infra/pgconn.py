"""PostgreSQL connections shared by the PostgreSQL/Redshift destinations and the SQL source.

`PostgresConnection` holds the connection keys (validated like any floe config), `connect_postgres`
opens a psycopg 3 connection and turns connection failures into one readable line (what failed:
unreachable host, authentication, missing database, TLS), and `read_batches` streams a query's
rows as Arrow record batches through a server-side cursor.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

import psycopg
import pyarrow as pa
from psycopg.types.string import TextLoader
from pydantic import Field, SecretStr, model_validator

from floe.core import secrets
from floe.core.destination import json_field
from floe.core.errors import DestinationError, FloeError
from floe.core.secrets import redact
from floe.core.settings import Model

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
# A server that vanishes without closing the connection (host down, network cut) is noticed within
# about a minute instead of never: TCP keepalives while waiting for an answer, and a limit on data
# left unacknowledged while sending (COPY). A live server, however slow, is never cut off.
DEAD_PEER_DETECTION = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                       "tcp_user_timeout": 60_000}


class PostgresConnection(Model):
    """Connection keys of a PostgreSQL-protocol server."""

    host: str = "localhost"
    port: int = 5432
    database: str = Field(description="The database (dbname) to connect to.")
    user: str
    password: SecretStr | None = None
    sslmode: SslMode = "prefer"
    sslrootcert: str | None = Field(default=None, description="CA bundle for verify-ca/verify-full.")
    connect_timeout: int = 10


URL_KEYS = ("host", "port", "database", "user", "password", "sslmode", "sslrootcert")


def url_keys(url: str) -> dict[str, Any]:
    """The connection keys a postgresql:// (or redshift://) URL names; ValueError saying what is wrong.
    The password is registered as a secret."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql", "redshift"):
        raise ValueError("must start with postgresql:// or redshift://")
    if not parsed.hostname or not parsed.path.strip("/") or not parsed.username:
        raise ValueError("needs a user, a host and a database (postgresql://user:pw@host:port/db)")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError("the port is not a number") from None
    password = unquote(parsed.password) if parsed.password else None
    secrets.register(password)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items() if k in ("sslmode", "sslrootcert")}
    port = port or (5439 if parsed.scheme == "redshift" else None)  # else: the config's default port
    keys = {"host": parsed.hostname, "database": unquote(parsed.path.strip("/")), "user": unquote(parsed.username),
            **query, "port": port, "password": password}
    return {k: v for k, v in keys.items() if v is not None}


class UrlConnection(PostgresConnection):
    """Connection keys that may also be given as one `url:` (a destination's config)."""

    url: SecretStr | None = Field(default=None, description=(
        "postgresql://user:password@host:port/database?sslmode=...: instead of host, port, database, user, "
        "password (and sslmode, sslrootcert)."))

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("url"):
            return data
        url = data["url"].get_secret_value() if isinstance(data["url"], SecretStr) else str(data["url"])
        try:
            keys = url_keys(url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if both := [k for k in URL_KEYS if k in data and k in keys]:
            raise ValueError(f"url: and {', '.join(both)}: both set; give the connection one way")
        return {**data, **keys}


def describe(settings: PostgresConnection) -> str:
    """Where we connect, without credentials: postgresql://user@host:port/database."""
    return f"postgresql://{settings.user}@{settings.host}:{settings.port}/{settings.database}"


def _reason(exc: Exception, settings: PostgresConnection) -> str:
    text = redact(str(exc)).strip()
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low or "authentication failed" in low:
        return f"authentication failed for user {settings.user!r} (check user and password)"
    if "does not exist" in low and "database" in low:
        return f"database {settings.database!r} does not exist"
    if "role" in low and "does not exist" in low:
        return f"user {settings.user!r} does not exist"
    if "connection refused" in low or "could not connect" in low or "timeout expired" in low:
        first = text.splitlines()[0].removeprefix("connection failed: ").strip() if text else "no answer"
        return f"server not reachable ({first})"
    if "ssl" in low or "certificate" in low:
        return f"TLS failed with sslmode={settings.sslmode} ({text})"
    return text


def connect_postgres(
    settings: PostgresConnection,
    *,
    where: str = "postgres",
    autocommit: bool = False,
    error: type[FloeError] = DestinationError,
    application_name: str = "floe",
) -> psycopg.Connection[Any]:
    """Open a connection (session time zone UTC). Raise `error` naming `where`, the URL and the reason."""
    params: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "dbname": settings.database, "user": settings.user,
        "sslmode": settings.sslmode, "connect_timeout": settings.connect_timeout,
        "application_name": application_name, **DEAD_PEER_DETECTION,
    }
    if settings.password is not None:
        params["password"] = settings.password.get_secret_value()
    if settings.sslrootcert:
        params["sslrootcert"] = settings.sslrootcert
    try:
        conn = psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        raise error(f"{where}: cannot connect to {describe(settings)}: {_reason(exc, settings)}") from None
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    if not autocommit:
        conn.commit()
    return conn


# --- reading rows as Arrow ------------------------------------------------------------------------
_OID_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(), 20: pa.int64(), 21: pa.int16(), 23: pa.int32(), 26: pa.int64(), 700: pa.float32(),
    701: pa.float64(), 25: pa.string(), 1043: pa.string(), 1042: pa.string(), 19: pa.string(),
    1082: pa.date32(), 1083: pa.time64("us"), 1114: pa.timestamp("us"), 1184: pa.timestamp("us", "UTC"),
    17: pa.binary(), 2950: pa.string(),
}
_JSON_OIDS = {114, 3802}


def arrow_field(name: str, oid: int, precision: int | None, scale: int | None) -> pa.Field:
    """The Arrow field for a result column of PostgreSQL type `oid` (JSON becomes a JSON text field)."""
    if oid in _JSON_OIDS:
        return json_field(name)
    if oid == 1700:  # numeric: exact decimal when the precision is declared, else exact text
        if precision and precision <= 38:
            return pa.field(name, pa.decimal128(precision, scale or 0))
        return pa.field(name, pa.string())
    return pa.field(name, _OID_TYPES.get(oid, pa.string()))


def _column(values: tuple[Any, ...], f: pa.Field) -> pa.Array:
    if pa.types.is_string(f.type):
        values = tuple(v if v is None or isinstance(v, str) else str(v) for v in values)  # type: ignore[assignment]
    elif pa.types.is_decimal(f.type):
        values = tuple(v if v is None or isinstance(v, Decimal) else Decimal(v) for v in values)  # type: ignore[assignment]
    return pa.array(values, type=f.type)


def read_batches(
    conn: psycopg.Connection[Any], sql: str, params: Any = (), batch_size: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Stream `sql`'s rows as record batches of at most `batch_size` rows (server-side cursor).

    Runs in the connection's current transaction; JSON/jsonb arrive as JSON text fields."""
    with conn.cursor(name="floe_read", withhold=False) as cur:
        for type_name in ("json", "jsonb", "uuid", "numeric"):
            cur.adapters.register_loader(type_name, TextLoader)
        cur.itersize = batch_size
        cur.execute(sql, params or None)
        schema: pa.Schema | None = None
        yielded = False
        while True:
            rows = cur.fetchmany(batch_size)
            if schema is None:
                desc = cur.description or []
                schema = pa.schema([arrow_field(d.name, d.type_code, d.precision, d.scale) for d in desc])
            if not rows:
                if not yielded:  # an empty result still tells the caller its columns
                    yield pa.RecordBatch.from_pylist([], schema=schema)
                return
            columns = list(zip(*rows, strict=True))
            yield pa.RecordBatch.from_arrays([_column(c, f) for c, f in zip(columns, schema, strict=True)], schema=schema)
            yielded = True
