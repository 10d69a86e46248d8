"""A deterministic generator of Sailthru Data Exporter files (same seed, same bytes).

Shapes follow the reference sample: JSON Lines in mongo-export style (`{ "k" : v }`), action
times as `{"$date": epoch ms}` (UTC), other times as ISO strings without zone in US Eastern time,
`opens`/`clicks` absent from message_blast lines without actions but always present (maybe
`[]`) in message_transactional, e-mail addresses wrapped in `<...>`.

A file dated D holds what happened on day D-1 (the exporter runs after midnight Eastern).
`message_blast_update` files re-send messages of the past 7 days that had new activity that
day, with all their activity so far. About 20% of messages are opened (1-4 opens each) and a
fifth of the opened ones clicked; some click URLs carry the recipient's address (`email=`),
as real tracking links do, and some profiles have an address in a var: PII hides everywhere.

With `unknown_keys` (the default), some lines carry keys floe does not read, as a newer exporter
may send (invented names, not from Sailthru's docs): `subject`/`labels` on blasts, `ab_variant` and
a nested `channel` on messages (some of their opens also carry a `device`), `optout_email` and a
`keys` object holding the address on profiles. A share of message_blast lines carries its own `id`.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

EASTERN = ZoneInfo("America/New_York")
DEVICES = ["Chrome", "Firefox", "Safari", "iPhone", "Android", "Gmail", "Outlook", None, None]
CITIES = [("Brooklyn, NY US", "NY US", "11201 US"), ("Austin, TX US", "TX US", "78701 US"),
          ("Portland, OR US", "OR US", "97201 US"), ("Toronto, ON CA", "ON CA", None)]
LISTS = ["Daily Newsletter", "Weekly Digest", "Breaking News", "Deals", "Sports", "Food & Drink", "Tech"]
TEMPLATES = ["NY BX Welcome", "Password Reset", "Order Confirmation", "Subscription Renewal"]


# Attributed revenue as some lines carry it (null in the reference sample): JSON numbers and numeric strings.
REVENUES: tuple[float | int | str, ...] = (12.5, "3.10", 0.1, 19.99, 0, 1234.567, "0.07")


@dataclass
class ExportSpec:
    """What to generate. Sizes are per export; `days` daily exports starting at `start`."""

    seed: int = 7
    profiles: int = 60
    days: int = 3
    blasts_per_day: int = 2
    audience: float = 0.7  # share of profiles each blast is sent to
    transactional_per_day: int = 10
    vars_per_profile: tuple[int, int] = (3, 12)
    start: date = date(2016, 4, 1)
    updates: bool = True
    gzip: bool = False
    client_id: str | None = None
    zip_name: str | None = None  # write one .zip (with __MACOSX junk, like the reference sample)
    open_rate: float = 0.2
    click_rate: float = 0.2  # of opened messages
    heavy_clickers: int = 0  # the first N profiles open and click (1-3 times) every message
    unknown_keys: bool = True  # some lines carry keys floe does not read (see the module docstring)


def dumps(doc: dict[str, Any]) -> str:
    """Mongo-export style: spaces around colons and inside the outer braces."""
    return "{ " + json.dumps(doc, separators=(", ", " : "))[1:-1] + " }"


def email_of(n: int) -> str:
    return f"reader.{n}@example.com"


def _ms(moment: datetime) -> dict[str, int]:
    return {"$date": int(moment.timestamp() * 1000)}


def _eastern(moment: datetime, ms: bool = True) -> str:
    local = moment.astimezone(EASTERN).replace(tzinfo=None)
    return local.isoformat(timespec="milliseconds" if ms else "seconds")


@dataclass
class Message:
    doc: dict[str, Any]
    actions: list[tuple[datetime, str | None]]  # (when, url or None for an open)
    email_n: int
    open_device: bool = False  # its opens carry a `device` key floe does not read

    def upto(self, moment: datetime, transactional: bool) -> dict[str, Any]:
        """The message as exported at `moment`: the actions that happened before it."""
        doc = dict(self.doc)
        opens = [{"ts": _ms(t), **({"device": "iPhone"} if self.open_device else {})}
                 for t, url in self.actions if url is None and t < moment]
        clicks = [{"url": url, "ts": _ms(t)} for t, url in self.actions if url is not None and t < moment]
        if transactional or opens:
            doc["opens"] = opens
        if transactional or clicks:
            doc["clicks"] = clicks
        return doc


def make_actions(rng: random.Random, sent: datetime, email_n: int, open_rate: float, click_rate: float
                 ) -> list[tuple[datetime, str | None]]:
    """Realistic activity: most messages untouched; opens over hours to days; few clicks."""
    if rng.random() >= open_rate:
        return []
    actions: list[tuple[datetime, str | None]] = []
    first = sent + timedelta(minutes=5 + int(rng.expovariate(1 / 600)))
    for i in range(1 + min(int(rng.expovariate(1.0)), 3)):
        actions.append((first + timedelta(minutes=i * rng.randint(1, 2000), seconds=rng.randint(0, 59)), None))
    if rng.random() < click_rate:
        for i in range(rng.randint(1, 3) if click_rate >= 1 else 1 + min(int(rng.expovariate(1.5)), 2)):
            url = f"https://news.example.com/story/{rng.randint(1, 5000)}?utm_source=sailthru"
            if rng.random() < 0.1:
                url += "&email=" + quote(email_of(email_n))
            actions.append((first + timedelta(seconds=30 + i * rng.randint(5, 900)), url))
    return actions


def _hex24(rng: random.Random) -> str:
    return f"{rng.getrandbits(96):024x}"


class Generator:
    def __init__(self, spec: ExportSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.profile_ids = [_hex24(self.rng) for _ in range(spec.profiles)]
        self.blast_id = 6364286
        self.messages: list[tuple[date, Message]] = []  # (send day, message) for updates
        self.profile_state: dict[int, dict[str, Any]] = {}
        self.odd = random.Random(spec.seed + 7919)  # its own draws: the rest stays as without unknown keys
        self.revenue = random.Random(spec.seed + 104729)  # the same, for message_revenue

    def unknown(self, doc: dict[str, Any], keys: dict[str, Any], share: float = 0.15) -> dict[str, Any]:
        """`doc` with `keys` spliced in after its first key, for a `share` of lines."""
        if not self.spec.unknown_keys or self.odd.random() >= share:
            return doc
        first, *rest = doc.items()
        return dict([first, *keys.items(), *rest])

    def file_name(self, collection: str, day: date | None) -> str:
        prefix = f"{self.spec.client_id}_" if self.spec.client_id else ""
        dated = f".{day:%Y%m%d}" if day else ""
        return f"{prefix}{collection}{dated}.json" + (".gz" if self.spec.gzip else "")

    def days(self) -> Iterator[tuple[date, datetime, datetime]]:
        for i in range(self.spec.days):
            file_day = self.spec.start + timedelta(days=i)
            begin = datetime.combine(file_day - timedelta(days=1), datetime.min.time(), EASTERN).astimezone(UTC)
            yield file_day, begin, begin + timedelta(days=1)

    def files(self) -> Iterator[tuple[str, list[str]]]:
        """(file name, lines) for every file, day by day."""
        s = self.spec
        for file_day, begin, end in self.days():
            blasts, sends = [], []
            for _ in range(s.blasts_per_day):
                self.blast_id += 1
                sent = begin + timedelta(hours=self.rng.randint(6, 18), minutes=self.rng.randint(0, 59))
                blast = {"name": f"Newsletter {self.blast_id} {sent:%b %d}", "day": f"{begin.astimezone(EASTERN):%Y-%m-%d}",
                         "id": self.blast_id}
                blasts.append(self.unknown(blast, {"subject": f"Your news for {sent:%A}", "labels": ["news", "daily"]},
                                           share=0.5))
                sends.append((self.blast_id, sent))
            yield self.file_name("blast", file_day), [dumps(b) for b in blasts]
            todays: list[Message] = []
            for blast_id, sent in sends:
                for message_id, n in enumerate(
                        i for i in range(s.profiles) if i < s.heavy_clickers or self.rng.random() < s.audience):
                    at = sent + timedelta(seconds=message_id // 50, milliseconds=self.rng.randint(0, 999))
                    doc = {"profile_id": self.profile_ids[n], "send_time": _eastern(at), "blast_id": blast_id,
                           "message_id": message_id % 61 + 1, "device": self.rng.choice(DEVICES),
                           "message_revenue": None, "delivery_status": None}
                    heavy = n < s.heavy_clickers
                    actions = make_actions(self.rng, at, n, 1.0 if heavy else s.open_rate, 1.0 if heavy else s.click_rate)
                    if s.unknown_keys and self.odd.random() < 0.3:
                        doc["id"] = _hex24(self.odd)
                    if self.revenue.random() < 0.2:  # a number or a string, as exporters vary
                        doc["message_revenue"] = self.revenue.choice(REVENUES)
                    todays.append(Message(self.unknown(doc, self.odd_message_keys()), actions, n,
                                          open_device=self.odd.random() < 0.1 and s.unknown_keys))
            yield self.file_name("message_blast", file_day), [
                dumps(m.upto(end, False)) for m in todays]
            if s.updates and file_day > s.start:
                recent = [m for d, m in self.messages if d > file_day - timedelta(days=7)
                          and any(begin <= t < end for t, _ in m.actions)]
                yield self.file_name("message_blast_update", file_day), [dumps(m.upto(end, False)) for m in recent]
            self.messages += [(file_day, m) for m in todays]
            yield self.file_name("message_transactional", file_day), [
                dumps(self.transactional(begin)) for _ in range(s.transactional_per_day)]
            active = sorted({m.email_n for _, m in self.messages if any(begin <= t < end for t, _ in m.actions)})
            wanted = range(s.profiles) if file_day == s.start else active
            yield self.file_name("profile", file_day), [dumps(self.profile(n, begin)) for n in wanted]

    def odd_message_keys(self) -> dict[str, Any]:
        return {"ab_variant": self.odd.choice("AB"), "channel": {"type": "email", "pool": self.odd.choice(["a", "b"])}}

    def transactional(self, begin: datetime) -> dict[str, Any]:
        n = self.rng.randrange(self.spec.profiles)
        at = begin + timedelta(seconds=self.rng.randint(0, 86399), milliseconds=self.rng.randint(0, 999))
        m = Message({"profile_id": self.profile_ids[n], "template": self.rng.choice(TEMPLATES),
                     "send_time": _eastern(at), "device": self.rng.choice(DEVICES), "message_revenue": None,
                     "delivery_status": None, "id": _hex24(self.rng)},
                    make_actions(self.rng, at, n, 0.4, 0.3), n)
        doc = m.upto(at + timedelta(days=3), True)
        doc["clicks"], doc["opens"] = doc.pop("clicks"), doc.pop("opens")
        doc["id"] = doc.pop("id")
        return self.unknown(doc, self.odd_message_keys())

    def profile(self, n: int, day: datetime) -> dict[str, Any]:
        rng = self.rng
        state = self.profile_state.get(n)
        if state is None:
            city, region, zip_label = rng.choice(CITIES)
            created = day - timedelta(days=rng.randint(30, 2000), seconds=rng.randint(0, 86399))
            lo, hi = self.spec.vars_per_profile
            variables: dict[str, Any] = {f"var_{k}": rng.choice([rng.randint(0, 99), f"v{rng.randint(0, 9)}", True, None])
                                         for k in range(rng.randint(lo, hi))}
            if n % 5 == 0:
                variables["alt_email"] = f"alt.{n}@example.org"
            state = {
                "geo": {"city": {city: rng.randint(1, 40)}, "state": {region: rng.randint(1, 40)},
                        "country": {region.split()[-1]: rng.randint(1, 60)},
                        **({"zip": {zip_label: rng.randint(1, 10)}} if zip_label else {}), "count": rng.randint(1, 80)},
                "browser": {b: rng.randint(1, 30) for b in rng.sample(["Chrome", "Safari", "Firefox", "Gmail"], 2)},
                "lists_signup": {name: _eastern(created + timedelta(days=i), ms=False)
                                 for i, name in enumerate(rng.sample(LISTS, rng.randint(1, 4)))},
                "vars": variables, "created": created, "opens": rng.randint(0, 500), "clicks": rng.randint(0, 150),
                "optout": rng.random() < 0.3,
            }
            self.profile_state[n] = state
        else:
            state["opens"] += rng.randint(1, 3)
            state["vars"]["last_active_day"] = f"{day:%Y-%m-%d}"
            state["vars"].pop("var_0", None)  # a removed var must vanish from profile_vars
        doc: dict[str, Any] = {"id": self.profile_ids[n], "email": f"<{email_of(n)}>", "browser": state["browser"],
                               "geo": state["geo"], "lists_signup": state["lists_signup"], "vars": state["vars"]}
        if state["optout"]:
            doc["optout_reason"], doc["optout_time"] = None, None
        doc.update({
            "signup_time": _eastern(state["created"]), "create_date": _eastern(state["created"], ms=False),
            "total_opens": state["opens"], "total_clicks": state["clicks"], "total_unique_opens": state["opens"] // 2,
            "total_unique_clicks": state["clicks"] // 2, "total_pageviews": rng.randint(0, 900),
            "total_messages": state["opens"] * 3 + 10, "last_open": _eastern(day, ms=False),
            "last_click": _eastern(day - timedelta(days=1), ms=False), "last_pageview": _eastern(day, ms=False),
        })
        return self.unknown(doc, {"optout_email": "none", "keys": {"email": email_of(n), "cookie": f"{n:032x}"}})


def encode(lines: list[str], gzipped: bool) -> bytes:
    data = "".join(line + "\n" for line in lines).encode()
    return gzip_module.compress(data, compresslevel=6, mtime=0) if gzipped else data


def generate(out: Path, spec: ExportSpec | None = None) -> list[Path]:
    """Write the export under `out` (a folder; or `out/<zip_name>`); return the paths written."""
    spec = spec or ExportSpec()
    out.mkdir(parents=True, exist_ok=True)
    generator = Generator(spec)
    if spec.zip_name:
        target = out / spec.zip_name
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, lines in generator.files():
                info = zipfile.ZipInfo(name, date_time=(2016, 4, 1, 0, 0, 0))
                archive.writestr(info, encode(lines, spec.gzip), zipfile.ZIP_DEFLATED)
                junk = zipfile.ZipInfo(f"__MACOSX/._{name}", date_time=(2016, 4, 1, 0, 0, 0))
                archive.writestr(junk, b"\x00\x05\x16\x07" + bytes(218))
        return [target]
    written = []
    for name, lines in generator.files():
        path = out / name
        path.write_bytes(encode(lines, spec.gzip))
        written.append(path)
    return written


def write_message_blast(out: Path, actions: int, files: int = 5, seed: int = 11, gzipped: bool = True) -> int:
    """Benchmark input: message_blast files holding about `actions` rows (actions, or bare messages)
    in total. Returns the exact number of rows the files explode to."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    profile_ids = [_hex24(rng) for _ in range(20_000)]
    per_file = actions // files
    total = 0
    blast_id = 7_000_000
    start = datetime(2016, 4, 1, 12, tzinfo=UTC)
    for i in range(files):
        name = out / (f"4484_message_blast.{(start + timedelta(days=i)):%Y%m%d}.json" + (".gz" if gzipped else ""))
        rows = 0
        buffer = io.StringIO()
        while rows < per_file:
            blast_id += 1
            sent = start + timedelta(days=i, minutes=rng.randint(0, 600))
            for n in range(len(profile_ids)):
                if rows >= per_file:
                    break
                acts = make_actions(rng, sent, n, 0.35, 0.25)
                doc = {"profile_id": profile_ids[n], "send_time": _eastern(sent), "blast_id": blast_id,
                       "message_id": n % 61 + 1, "device": DEVICES[n % len(DEVICES)],
                       "message_revenue": None, "delivery_status": None}
                doc = Message(doc, acts, n).upto(sent + timedelta(days=30), False)
                buffer.write(dumps(doc) + "\n")
                rows += max(len(acts), 1)
        total += rows
        data = buffer.getvalue().encode()
        name.write_bytes(gzip_module.compress(data, compresslevel=1, mtime=0) if gzipped else data)
    return total
