"""The FullStory emulator's events, as DuckDB SQL: event `k` is a pure function of `k` and the seed.

`COLUMNS` (and the mobile and later fields) say how each field is computed and when it is left out,
sent as `null` or spelt differently; `write_events` writes one export's gzip file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson

# (field name, DuckDB expression over k (BIGINT), h (UBIGINT hash of k), us (event time, µs)).
# A NULL omits the field from the event.
_TS = "strftime(make_timestamp(({x})::BIGINT), '%Y-%m-%dT%H:%M:%S.%fZ')"
_TYPES = "['click','navigate','change','custom','console_message','exception','seen','cumulative_layout_shift']"
COLUMNS: list[tuple[str, str]] = [
    ("IndvId", "9007199254740993 + (h % 5000) * 2"),  # > 2^53 and odd: a float64 would round it
    ("UserId", "5764607523034234881 + (h % 5000)"),
    ("SessionId", "6917529027641081857 + ((h >> 8) % 50000)"),
    ("PageId", "1152921504606846977 + ((h >> 16) % 500000)"),
    ("UserCreated", f"CASE WHEN h % 3 = 0 THEN {_TS.format(x='1577836800000000 + (h % 5000) * 3600000000')} END"),
    ("UserAppKey", "CASE WHEN h % 3 = 0 THEN 'acct-' || (h % 5000)::VARCHAR WHEN h % 3 = 1 THEN '' END"),
    ("UserDisplayName", "CASE WHEN h % 3 = 0 THEN 'User ' || (h % 5000)::VARCHAR END"),
    ("UserEmail", "CASE WHEN h % 3 = 0 THEN 'user' || (h % 5000)::VARCHAR || '@example.com' WHEN h % 3 = 1 THEN '' END"),
    ("EventStart", _TS.format(x="us")),
    ("EventType", f"{_TYPES}[1 + (h % 8)::INT]"),
    ("EventSubType", "CASE WHEN h % 8 = 1 THEN ['navigate','reload','back_forward'][1 + ((h >> 3) % 3)::INT] "
                     "WHEN h % 8 = 4 THEN 'error' END"),
    ("EventCustomName", "CASE WHEN h % 8 = 3 THEN ['Order Completed','Signed Up','Product Viewed']"
                        "[1 + ((h >> 3) % 3)::INT] END"),
    ("EventTargetText", "CASE WHEN h % 8 = 0 THEN ['Add to cart','Buy \"now\"','Weiter →','Line1\nLine2']"
                        "[1 + ((h >> 5) % 4)::INT] END"),
    ("EventTargetSelector", "CASE WHEN h % 8 = 2 OR (h % 8 = 0 AND (h >> 13) % 2 = 0) "
                            "THEN 'div.cart > button#add-' || ((h >> 9) % 50)::VARCHAR END"),
    # The legacy tokenised selector (hauser's v1 schema), instead of EventTargetSelector on some events.
    ("EventTargetSelectorTok", "CASE WHEN h % 8 = 6 OR (h % 8 = 0 AND (h >> 13) % 2 = 1) "
                               "THEN 'html body div .cart button .add%2D' || ((h >> 9) % 50)::VARCHAR END"),
    ("EventPageOffset", "(h >> 20) % 600000"),
    ("EventSessionOffset", "(h >> 20) % 3600000"),
    ("EventModFrustrated", "CASE WHEN h % 97 = 0 THEN 1 END"),
    ("EventModDead", "CASE WHEN h % 89 = 0 THEN 1 END"),
    ("EventModError", "CASE WHEN h % 8 = 5 THEN 1 END"),
    ("EventCumulativeLayoutShift", "CASE WHEN h % 8 = 7 THEN ((h >> 7) % 1000) / 4000.0 END"),
    ("SessionStart", _TS.format(x="us - ((h >> 20) % 3600000) * 1000")),
    ("PageName", "['Home','Product','Cart','Checkout'][1 + ((h >> 16) % 4)::INT]"),
    ("PageStart", _TS.format(x="us - ((h >> 20) % 600000) * 1000")),
    ("PageDuration", "(h >> 24) % 600000"),
    ("PageActiveDuration", "(h >> 25) % 300000"),
    ("PageUrl", "'https://shop.example.com/' || ['','p/','cart','checkout'][1 + ((h >> 16) % 4)::INT] "
                "|| ((h >> 16) % 997)::VARCHAR"),
    ("PageRefererUrl", "CASE WHEN h % 5 = 0 THEN 'https://www.google.com/' END"),
    ("PageIp", "CASE WHEN (h >> 8) % 5 = 0 THEN '' ELSE '10.' || ((h >> 8) % 250)::VARCHAR || '.' "
               "|| ((h >> 16) % 250)::VARCHAR || '.7' END"),
    ("PageLatLong", "'52.52,13.40'"),
    ("PageUserAgent", "['Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0','Mozilla/5.0 (iPhone; CPU iPhone OS 17_1) "
                      "Safari/604.1'][1 + ((h >> 8) % 2)::INT]"),
    ("PageBrowser", "['Chrome','Mobile Safari'][1 + ((h >> 8) % 2)::INT]"),
    ("PageDevice", "['Desktop','Mobile'][1 + ((h >> 8) % 2)::INT]"),
    ("PageOperatingSystem", "['Linux','iOS'][1 + ((h >> 8) % 2)::INT]"),
    ("PageScreenWidth", "[1920, 390][1 + ((h >> 8) % 2)::INT]"),
    ("PageScreenHeight", "[1080, 844][1 + ((h >> 8) % 2)::INT]"),
    ("PageNumEvents", "(h >> 30) % 500"),
    ("PageNumErrors", "(h >> 31) % 3"),
    ("PageClusterId", "(h >> 16) % 997"),
    ("PageMaxScrollDepthPercent", "(h >> 12) % 101"),
    ("LoadDomContentTime", "CASE WHEN h % 8 = 1 THEN (h >> 9) % 3000 END"),
    ("LoadFirstPaintTime", "CASE WHEN h % 8 = 1 THEN (h >> 10) % 2000 END"),
    # Custom vars: about two events in three carry none; each is set on a few events only.
    ("user_plan_str", "CASE WHEN (h >> 4) % 8 = 0 THEN ['free','pro \"gold\"','enterprise'][1 + ((h >> 7) % 3)::INT] END"),
    ("user_signup_date", "CASE WHEN (h >> 4) % 16 = 8 THEN strftime(make_timestamp((1577836800 + (h % 5000) "
                         "* 86400)::BIGINT * 1000000), '%Y-%m-%dT%H:%M:%SZ') END"),  # date-like text
    ("evt_order.total_real", "CASE WHEN h % 8 = 3 THEN ((h >> 6) % 100000) / 100.0 END"),
    ("evt_items_int", "CASE WHEN h % 8 = 3 THEN (h >> 6) % 9 END"),
    ("evt_orderId_int", "CASE WHEN h % 8 = 3 AND (h >> 5) % 2 = 0 THEN 4611686018427387905 + (h >> 9) % 1000000 END"),
    ("evt_tags_strs", "CASE WHEN h % 8 = 3 AND (h >> 7) % 4 = 0 THEN ['sale', 'aisle ' || ((h >> 9) % 20)::VARCHAR] END"),
    ("page_experiment_bool", "CASE WHEN h % 8 = 1 AND (h >> 40) % 2 = 0 THEN (h >> 41) % 2 = 0 END"),
]
# Fields sent as an explicit `null` (instead of being left out) when the condition holds.
_NULLS = {"EventSubType": "h % 8 = 0 AND (h >> 3) % 4 = 0", "user_plan_str": "(h >> 4) % 8 = 1",
          "evt_items_int": "h % 8 = 2", "page_experiment_bool": "h % 8 = 1 AND (h >> 40) % 4 = 1"}
# Keys sent in another casing when the condition holds.
_SPELLINGS = {"PageUrl": ("pageUrl", "(h >> 3) % 64 = 5"), "UserId": ("USERID", "(h >> 3) % 64 = 9")}
# Page-level fields travel on the page's navigate events only (keeps files near 600 bytes per event).
_NAVIGATE_ONLY = {"SessionStart", "PageStart", "PageRefererUrl", "PageIp", "PageLatLong", "PageUserAgent",
                  "PageBrowser", "PageDevice", "PageOperatingSystem", "PageScreenWidth", "PageScreenHeight"}
COLUMNS = [(n, f"CASE WHEN h % 8 = 1 THEN {e} END" if n in _NAVIGATE_ONLY else e) for n, e in COLUMNS]
# Fields that appear only in exports starting at or after `new_fields_from`.
LATER_COLUMNS: list[tuple[str, str]] = [
    ("ReqUrl", "CASE WHEN h % 8 = 6 THEN 'https://api.example.com/v1/cart/' || ((h >> 9) % 50)::VARCHAR END"),
    ("ReqMethod", "CASE WHEN h % 8 = 6 THEN ['GET','POST'][1 + ((h >> 9) % 2)::INT] END"),
    ("ReqStatus", "CASE WHEN h % 8 = 6 THEN [200, 201, 404, 500][1 + ((h >> 9) % 4)::INT] END"),
    ("EventFutureField", "CASE WHEN h % 16 = 9 THEN 'v' || ((h >> 9) % 7)::VARCHAR END"),
]
# Mobile app fields (IncludeMobileAppsFields), present on the mobile half of the traffic.
MOBILE_COLUMNS: list[tuple[str, str]] = [
    ("AppName", "CASE WHEN (h >> 8) % 2 = 1 THEN 'Shop' END"),
    ("AppVersion", "CASE WHEN (h >> 8) % 2 = 1 THEN '4.' || ((h >> 11) % 3)::VARCHAR END"),
]


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parse_time(value: str) -> datetime:
    """RFC3339 (with `Z`) -> aware UTC datetime."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return dt.astimezone(UTC)


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _us(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def wanted(name: str, fields: list[str] | None) -> bool:
    """Whether a request's `fields` (None: every field) ask for `name`: by name or `prefix*` pattern."""
    if fields is None:
        return True
    lower = name.lower()
    return any(lower.startswith(f[:-1].lower()) if f.endswith("*") else lower == f.lower() for f in fields)


def fragment(name: str, value: str) -> str:
    """DuckDB text `"name":<value as JSON>` for one event, in the spelling and null-ness it is sent with;
    NULL (the field is left out) where `value` is NULL."""
    key = _sql_str(orjson.dumps(name).decode() + ":")
    if name in _SPELLINGS:
        other, when = _SPELLINGS[name]
        key = f"CASE WHEN {when} THEN {_sql_str(orjson.dumps(other).decode() + ':')} ELSE {key} END"
    text = f"to_json({value})::VARCHAR"
    if name in _NULLS:
        text = f"CASE WHEN {_NULLS[name]} THEN 'null' ELSE {text} END"
    return f"{key} || {text}"


def write_events(path: Path, export_format: str, minified: bool, cols: list[tuple[str, str]], step: int,
                 seed: int, start: datetime, end: datetime) -> None:
    """Write the gzip file of the events in [start, end) with the fields `cols` (see `COLUMNS`):
    one event per line (FORMAT_NDJSON), or one JSON array, minified or one element per line. Event
    `k` happens at `k * step + jitter(k)` microseconds since the Unix epoch."""
    lo, hi = _us(start) // step - 1, -(-_us(end) // step) + 1
    # concat_ws skips NULL fragments, so fields whose value is NULL are left out of the event.
    fragments = ", ".join(fragment(n, e) for n, e in cols) or "NULL"
    events = (
        f"SELECT '{{' || concat_ws(',', {fragments}) || '}}' AS line, us FROM "
        f"(SELECT k, h, k * {step} + (h % {step})::BIGINT AS us FROM "
        f"(SELECT k, hash(k * 1000003 + {seed}) AS h FROM range({lo}, {hi}) t(k))) "
        f"WHERE us >= {_us(start)} AND us < {_us(end)}"
    )
    copy = "(FORMAT CSV, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\x01', COMPRESSION GZIP)"
    con = duckdb.connect(config={"threads": 2, "autoinstall_known_extensions": False})
    try:
        if export_format == "FORMAT_NDJSON":
            body = f"SELECT line FROM ({events}) ORDER BY us"
        elif minified:
            body = f"SELECT '[' || coalesce(string_agg(line, ',' ORDER BY us), '') || ']' FROM ({events})"
        else:
            n = con.execute(f"SELECT count(*) FROM ({events})").fetchone()[0]  # type: ignore[index]
            body = (f"SELECT CASE WHEN rn = 1 THEN '[' ELSE '' END || line || CASE WHEN rn = {n} THEN ']' "
                    f"ELSE ',' END AS line FROM (SELECT line, row_number() OVER (ORDER BY us) AS rn "
                    f"FROM ({events}))")
            body = body if n else "SELECT '[]' AS line"
        con.execute(f"COPY ({body}) TO '{path}' {copy}")
    finally:
        con.close()
