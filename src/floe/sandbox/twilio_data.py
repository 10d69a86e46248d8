"""The Twilio emulator's data: every list record is a pure function of (seed, index, clock).

Record `i` of a list is created at `time(i)`, increasing with `i`; lists are served newest first
(by index, i.e. by sid, which Twilio says is "close to the date/time created sort but may not always
be exact": here `date_created` lags the index order by 0-30 s at random). What a record says depends
on the sandbox clock: each record has a timeline of events and is served as it stands at `now`.
Moving the clock (`Clock.now`) creates newer records and changes existing ones after the fact.

Timelines (shares of records; delays in seconds; "published" = Twilio's docs, else inferred):
- Calls: 2% are canceled while queued and 1% fail before dialing: they never get a `start_time`
  (published: "empty if the call has not yet been dialed"). The others wait in the queue 1-3 s
  (4%: 1 minute to 2 hours, log-uniform: an outbound queue held back by the account's rate), ring
  3-25 s, then are busy (3%), unanswered (6%), failed (1%) or answered (1-900 s). `duration` and
  `end_time` appear when the call ends (`duration` stays empty for busy, failed and unanswered
  calls: published). An answered call's `price` appears `price_delay` after it ends (published:
  "may not be immediately available").
- Messages: 25% inbound (`received` at once); 72% outbound: `queued` 1-4 s without `date_sent`,
  then `sent`, then `delivered` (92%) or `undelivered` after `receipt_delay`; 2% scheduled 15 minutes
  to 7 days ahead (`scheduled`, no `date_sent`), a fifth of which are canceled before they go out;
  1% fail before sending (error 30450, never a `date_sent`, not charged). `price` appears
  `price_delay` after sending.
- Recordings: `processing` for 5-60 s, then `completed`; `price` after `price_delay`; 3% are deleted
  1 hour to 5 days later (status `deleted`, listed only with `IncludeSoftDeleted=true`).

`price_delay`: 85% within 2 minutes, 13% 2 minutes to 24 hours, 2% 1 to 5 days (Twilio: "up to 24
hours in rare cases" for messages; the multi-day tail is inferred from peers re-reading 7-15 days).
`receipt_delay`: 93% within 30 s, 6% 30 s to 24 hours, 1% 1 to 3 days (inferred).
Sparse and unknown fields: a tenth of calls lack `group_sid` and `trunk_sid` and carry the retired
`annotation`; a twelfth of messages lack `messaging_service_sid`; an eighth of recordings are encrypted.

Records are rendered to JSON in chunks of 1,000, newest first, into one bytes object per chunk
(with each record's offset and the fields filters look at), so a page is a few slices of cached
bytes; a chunk is rendered again only once one of its records changes or it grows.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from floe.sandbox.twilio_pages import CHUNK, Chunk, ListFilter, Meta, enclose, select

M64 = (1 << 64) - 1
DAY = 86400
API_VERSION = "2010-04-01"
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# The most a record's cursor (start_time, date_sent) can trail its creation: date filters scan this far back.
CURSOR_LAG = {"calls": 2 * 3600 + 30, "messages": 7 * DAY + 60, "recordings": 0, "incoming_phone_numbers": 0}
SID_PREFIX = {"calls": "CA", "recordings": "RE", "incoming_phone_numbers": "PN"}
CALL_STATUSES = ("queued", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled")
CALL_DIRECTIONS = ("inbound", "outbound-api", "outbound-api", "outbound-dial")
MSG_DIRECTIONS = ("outbound-api", "outbound-api", "outbound-reply")
BODIES = ("Your code is 123456", "See you at 5?", "Order #8812 has shipped", "Zoë says héllo 👋",
          "Reply STOP to unsubscribe", "", "ok")
CALLER_NAMES = (None, None, None, "JANE DOE", "Zoë Ångström", "ACME CORP")
CALL_SUBRESOURCES = [(re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(), name) for name in (
    "Notifications", "Recordings", "Payments", "Events", "Siprec", "Streams", "Transcriptions",
    "UserDefinedMessageSubscriptions", "UserDefinedMessages")]  # (key, path name), as Twilio lists them



def mix(x: int) -> int:
    """splitmix64: a cheap, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def hash_kind(kind: str) -> int:
    return int.from_bytes(hashlib.blake2b(kind.encode(), digest_size=8).digest(), "big")


def unit(h: int, k: int) -> float:
    """The k-th uniform number in [0, 1) drawn from hash `h`."""
    return mix((h + k * 0xD1B54A32D192ED03) & M64) / 2.0**64


def log_uniform(u: float, lo: float, hi: float) -> int:
    return int(lo * (hi / lo) ** u)


def price_delay(h: int) -> int:
    u, v = unit(h, 20), unit(h, 21)
    if u < 0.85:
        return 5 + int(v * 115)
    return log_uniform(v, 120, DAY) if u < 0.98 else log_uniform(v, DAY, 5 * DAY)


def receipt_delay(h: int) -> int:
    u, v = unit(h, 22), unit(h, 23)
    if u < 0.93:
        return 1 + int(v * 29)
    return log_uniform(v, 30, DAY) if u < 0.99 else log_uniform(v, DAY, 3 * DAY)


_day_prefix: dict[int, str] = {}


def rfc2822(ts: int | None) -> str | None:
    """Epoch seconds -> Twilio's RFC 2822 form, e.g. 'Fri, 18 Oct 2019 17:00:00 +0000'."""
    if ts is None:
        return None
    day, sec = divmod(ts, 86400)
    prefix = _day_prefix.get(day)
    if prefix is None:
        d = datetime.fromtimestamp(day * 86400, UTC)
        prefix = _day_prefix[day] = f"{_DAY_NAMES[d.weekday()]}, {d.day:02d} {_MONTHS[d.month - 1]} {d.year} "
    h, rem = divmod(sec, 3600)
    return f"{prefix}{h:02d}:{rem // 60:02d}:{rem % 60:02d} +0000"


def _phone(h: int) -> str:
    return f"+1{415 + h % 300}555{(h >> 12) % 10000:04d}"


def _formatted(phone: str) -> str:
    return f"({phone[2:5]}) {phone[5:8]}-{phone[8:]}"


def _message_prefix(h: int) -> str:
    return "MM" if (h >> 46) % 8 == 0 else "SM"  # MM: a message with media


def _sid(prefix: str, h: int, i: int) -> str:
    return f"{prefix}{h & 0xFFFFFFFFFFFF:012x}{i:020x}"


@dataclass
class Clock:
    """The sandbox's "now" (epoch seconds), shared by all its lists."""

    now: int


@dataclass
class Timeline:
    """A record as created plus its later changes [(when, fields)], in time order."""

    record: dict[str, Any]
    created: int
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def at(self, now: int) -> tuple[dict[str, Any], int | None]:
        """The record as it stands at `now`, and when it next changes (None: never)."""
        record, updated = self.record, self.created
        for when, changes in self.events:
            if when > now:
                record["date_updated"] = rfc2822(updated)
                return record, when
            record.update(changes)
            updated = when
        record["date_updated"] = rfc2822(updated)
        return record, None


@dataclass
class ListResource:
    """One list (Calls, Messages, Recordings, IncomingPhoneNumbers) of one account.

    `base_count` records lie in the `days` before the clock's start; newer ones appear as the clock moves."""

    kind: str  # calls | messages | recordings | incoming_phone_numbers
    account_sid: str
    seed: int
    base_count: int
    end: int  # epoch seconds: the newest of the first `base_count` records is created at or before it
    days: float
    clock: Clock
    cache_chunks: int = 2000
    cache: dict[int, Chunk] = field(default_factory=dict)
    amendments: dict[int, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)  # see `amend`

    def __post_init__(self) -> None:
        self.n = max(1, self.base_count)
        self.span = max(1, int(self.days * DAY))
        self.origin = self.end - self.span
        self.salt = mix(self.seed * 7919 + hash_kind(self.kind))

    # --- time axis (monotone in i; base_count records in the `days` before `end`, then the same rate) ---
    def _slot(self, i: int) -> int:
        return self.origin + i * self.span // self.n

    def time(self, i: int) -> int:
        slot, following = self._slot(i), self._slot(i + 1)
        return slot + 1 + mix(self.salt ^ i) % max(1, following - slot)

    @property
    def start(self) -> int:
        return self.origin

    @property
    def count(self) -> int:
        """Records created at or before the clock."""
        now = self.clock.now
        k = max(0, (now - self.origin) * self.n // self.span)
        while k > 0 and self.time(k - 1) > now:
            k -= 1
        while self.time(k) <= now:
            k += 1
        return k

    def first_at_or_after(self, ts: int) -> int:
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(mid) < ts:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def sid(self, i: int) -> str:
        h = mix(self.salt + i)
        return _sid(_message_prefix(h) if self.kind == "messages" else SID_PREFIX[self.kind], h, i)

    def index_of(self, sid: str) -> int | None:
        try:
            i = int(sid[14:], 16)
        except ValueError:
            return None
        return i if 0 <= i < self.count and self.sid(i) == sid else None

    # --- records ------------------------------------------------------------------------------
    def record(self, i: int) -> dict[str, Any]:
        """Record `i` as it stands now."""
        return self._render(i)[0]

    def meta(self, i: int) -> Meta:
        return self._render(i)[1]

    def timeline(self, i: int) -> tuple[Timeline, int | None, int | None]:
        """Record `i`'s whole timeline, when its cursor is set and when it ends (None: never)."""
        timeline, cursor_at, end_at = getattr(self, f"_{self.kind}")(i, mix(self.salt + i), self.time(i))
        if i in self.amendments:  # after the record's own events of the same moment
            timeline.events = sorted(timeline.events + self.amendments[i], key=lambda event: event[0])
        return timeline, cursor_at, end_at

    def amend(self, i: int, changes: dict[str, Any]) -> dict[str, Any]:
        """Change record `i` now (at the clock), after the fact, as Twilio re-rating a call does: `changes`
        (e.g. `{"price": "-0.25000", "status": "failed"}`) apply from now on, its `date_updated` is now.
        Later events of its own timeline still apply. Returns the record as it stands now."""
        self.amendments.setdefault(i, []).append((self.clock.now, dict(changes)))
        self.cache.pop(i // CHUNK, None)
        return self.record(i)

    def _render(self, i: int) -> tuple[dict[str, Any], Meta, int | None]:
        timeline, cursor_at, end_at = self.timeline(i)
        now = self.clock.now
        record, next_change = timeline.at(now)
        cursor = cursor_at if cursor_at is not None and cursor_at <= now else None
        end = end_at if end_at is not None and end_at <= now else None
        return record, (cursor, timeline.created, record["status"], end), next_change

    def _uri(self, name: str, sid: str) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/{name}/{sid}.json"

    def _calls(self, i: int, h: int, t: int) -> tuple[Timeline, int | None, int | None]:
        sid = _sid("CA", h, i)
        created = t - int(unit(h, 1) * 31)
        direction = CALL_DIRECTIONS[(h >> 5) % 4]
        to, frm = _phone(h >> 20), _phone(h >> 34)
        uri = self._uri("Calls", sid)
        record: dict[str, Any] = {
            "sid": sid, "date_created": rfc2822(created), "date_updated": None,
            "parent_call_sid": _sid("CA", h >> 3, i + 1) if direction == "outbound-dial" else None,
            "account_sid": self.account_sid, "to": to, "to_formatted": _formatted(to), "from": frm,
            "from_formatted": _formatted(frm), "phone_number_sid": _sid("PN", h >> 7, (h >> 40) % 50),
            "status": "queued", "start_time": None, "end_time": None, "duration": None, "price": None,
            "price_unit": "USD", "direction": direction, "answered_by": None, "api_version": API_VERSION,
            "forwarded_from": _phone(h >> 50) if (h >> 48) % 16 == 0 else None, "group_sid": None,
            "caller_name": CALLER_NAMES[(h >> 52) % len(CALLER_NAMES)], "queue_time": "0", "trunk_sid": None,
            "uri": uri, "subresource_uris": {key: f"{uri[:-5]}/{name}.json" for key, name in CALL_SUBRESOURCES},
        }
        if (h >> 56) % 10 == 0:  # an older record: keys missing, a field floe does not know
            del record["group_sid"], record["trunk_sid"]
            record["annotation"] = None
        timeline = Timeline(record, created)
        u = unit(h, 2)
        if u < 0.03:  # canceled while queued, or failed before dialing: never a start_time
            status = "canceled" if u < 0.02 else "failed"
            timeline.events.append((t + 2 + int(unit(h, 3) * 300), {"status": status}))
            return timeline, None, None
        queue = 1 + h % 3 if unit(h, 4) < 0.96 else log_uniform(unit(h, 5), 60, 7200)
        start = t + queue
        ring = 3 + (h >> 14) % 23
        outcome = unit(h, 6)
        final = "busy" if outcome < 0.03 else "no-answer" if outcome < 0.09 else "failed" if outcome < 0.10 else None
        timeline.events.append((start, {"status": "ringing", "start_time": rfc2822(start), "queue_time": str(queue)}))
        if final is not None:
            end = start + ring
            timeline.events.append((end, {"status": final, "end_time": rfc2822(end)}))
            return timeline, start, end
        talk = 1 + (h >> 24) % 900
        end = start + ring + talk
        timeline.events += [
            (start + ring, {"status": "in-progress", "answered_by": ("human", "machine_start", None)[(h >> 44) % 3]}),
            (end, {"status": "completed", "end_time": rfc2822(end), "duration": str(talk)}),
            (end + price_delay(h), {"price": f"-{0.0085 * (1 + talk // 60) + ((h >> 30) % 7) / 1000:.5f}"}),
        ]
        return timeline, start, end

    def _messages(self, i: int, h: int, t: int) -> tuple[Timeline, int | None, int | None]:
        sid = _sid(_message_prefix(h), h, i)
        body = BODIES[(h >> 14) % len(BODIES)]
        u = unit(h, 2)
        inbound = u < 0.25
        uri = self._uri("Messages", sid)
        record: dict[str, Any] = {
            "body": body, "num_segments": str(1 + len(body) // 160),
            "direction": "inbound" if inbound else MSG_DIRECTIONS[(h >> 5) % 3],
            "from": _phone(h >> 20), "to": _phone(h >> 34), "date_updated": None, "price": None,
            "error_message": None, "uri": uri, "account_sid": self.account_sid,
            "num_media": str(1 + (h >> 44) % 3 if sid.startswith("MM") else 0), "status": "queued",
            "messaging_service_sid": _sid("MG", self.salt, 0) if (h >> 40) % 3 == 0 else None, "sid": sid,
            "date_sent": None, "date_created": rfc2822(t), "error_code": None, "price_unit": "USD",
            "api_version": API_VERSION,
            "subresource_uris": {"media": f"{uri[:-5]}/Media.json", "feedback": f"{uri[:-5]}/Feedback.json"},
        }
        if (h >> 56) % 12 == 0:
            del record["messaging_service_sid"]
        timeline = Timeline(record, t)
        price = {"price": f"-{((h >> 24) % 90 + 1) / 10000 + 0.0075:.5f}"}
        if inbound:
            record.update(status="received", date_sent=rfc2822(t))
            timeline.events.append((t + price_delay(h), price))
            return timeline, t, None
        if u < 0.26:  # failed before sending (SMS pumping protection): no date_sent, not charged
            timeline.events.append((t + 1, {"status": "failed", "error_code": 30450,
                                            "error_message": "Message delivery blocked by SMS Pumping Protection"}))
            return timeline, None, None
        send = t + 1 + h % 4
        if u < 0.28:  # scheduled
            record["status"] = "scheduled"
            send = t + log_uniform(unit(h, 7), 900, 7 * DAY)
            if unit(h, 8) < 0.2:
                timeline.events.append((t + int(unit(h, 9) * (send - t)), {"status": "canceled"}))
                return timeline, None, None
        timeline.events.append((send, {"status": "sent", "date_sent": rfc2822(send)}))
        receipt = send + receipt_delay(h)
        if unit(h, 10) < 0.92:
            timeline.events.append((receipt, {"status": "delivered"}))
        else:
            timeline.events.append((receipt, {"status": "undelivered", "error_code": 30006,
                                              "error_message": "Landline or unreachable carrier"}))
        timeline.events.append((send + price_delay(h), price))
        timeline.events.sort(key=lambda e: e[0])
        return timeline, send, None

    def _recordings(self, i: int, h: int, t: int) -> tuple[Timeline, int | None, int | None]:
        sid = _sid("RE", h, i)
        duration = (h >> 14) % 600 + 1
        uri = self._uri("Recordings", sid)
        record = {
            "account_sid": self.account_sid, "api_version": API_VERSION, "call_sid": _sid("CA", h >> 3, i),
            "conference_sid": None, "date_created": rfc2822(t), "date_updated": None,
            "start_time": rfc2822(t - duration), "duration": str(duration), "sid": sid, "price": None,
            "price_unit": "USD", "status": "processing", "channels": 1 + (h >> 30) % 2,
            "source": ("DialVerb", "RecordVerb", "OutboundAPI", "StartCallRecordingAPI")[(h >> 33) % 4],
            "error_code": None, "uri": uri, "encryption_details": None,
            "subresource_uris": {"add_on_results": f"{uri[:-5]}/AddOnResults.json",
                                 "transcriptions": f"{uri[:-5]}/Transcriptions.json"},
            "media_url": f"https://api.twilio.com{uri[:-5]}",
        }
        if (h >> 56) % 8 == 0:
            record["encryption_details"] = {"encryption_public_key_sid": _sid("CR", h >> 2, 0),
                                            "encryption_cek": f"{h:016x}", "encryption_iv": f"{h >> 8:014x}"}
        timeline = Timeline(record, t)
        timeline.events += [(t + 5 + (h >> 40) % 56, {"status": "completed"}),
                            (t + price_delay(h), {"price": f"-{((h >> 24) % 50 + 1) / 1000:.4f}"})]
        if unit(h, 11) < 0.03:
            timeline.events.append((t + log_uniform(unit(h, 12), 3600, 5 * DAY), {"status": "deleted"}))
        timeline.events.sort(key=lambda e: e[0])
        return timeline, t, None

    def _incoming_phone_numbers(self, i: int, h: int, t: int) -> tuple[Timeline, int | None, int | None]:
        sid = _sid("PN", h, i)
        number = _phone(h >> 8)
        record = {
            "account_sid": self.account_sid, "address_requirements": ("none", "any", "local")[h % 3],
            "address_sid": None, "api_version": API_VERSION, "beta": False if h % 5 else None,
            "capabilities": {"voice": True, "sms": True, "mms": (h >> 3) % 2 == 0, "fax": False},
            "date_created": rfc2822(t), "date_updated": None, "emergency_status": "Inactive",
            "emergency_address_sid": None, "emergency_address_status": "unregistered",
            "friendly_name": _formatted(number), "identity_sid": None, "origin": "twilio", "phone_number": number,
            "sid": sid, "sms_application_sid": "", "sms_fallback_method": "POST", "sms_fallback_url": "",
            "sms_method": "POST", "sms_url": f"https://example.com/sms/{i}", "status_callback": "",
            "status_callback_method": "POST", "trunk_sid": None, "uri": self._uri("IncomingPhoneNumbers", sid),
            "voice_receive_mode": "voice", "voice_application_sid": "", "voice_caller_id_lookup": (h >> 5) % 2 == 0,
            "voice_fallback_method": "POST", "voice_fallback_url": None, "voice_method": "POST",
            "voice_url": f"https://example.com/voice/{i}", "bundle_sid": None, "status": "in-use", "type": "local",
        }
        return Timeline(record, t), t, None

    # --- rendering with a chunk cache -----------------------------------------------------------
    # A chunk is CHUNK consecutive records rendered newest first into ONE bytes object plus the start
    # offset of each record, so a page is a few slices. (Keeping orjson's per-record bytes alive
    # instead costs ~8x the JSON size in memory.) Once the clock moves, only the records that changed
    # are rendered again.
    def chunk(self, c: int) -> Chunk:
        size = min(self.count, (c + 1) * CHUNK) - c * CHUNK
        old = self.cache.get(c)
        now = self.clock.now
        if old is not None and old.size == size and now < old.valid_until:
            return old
        encoded, meta, changes = [], [], []
        old_newest = c * CHUNK + old.size - 1 if old is not None else -1
        for j in range(c * CHUNK + size - 1, c * CHUNK - 1, -1):
            p = old_newest - j
            if old is not None and j <= old_newest and old.changes[p] > now:  # unchanged since rendered
                encoded.append(old.blob[old.starts[p]:old.starts[p + 1] - 1])
                meta.append(old.meta[p])
                changes.append(old.changes[p])
                continue
            record, m, next_change = self._render(j)
            encoded.append(orjson.dumps(record))
            meta.append(m)
            changes.append(float("inf") if next_change is None else next_change)
        starts, pos = [], 0
        for item in encoded:
            starts.append(pos)
            pos += len(item) + 1
        starts.append(pos)
        chunk = Chunk(b",".join(encoded), starts, meta, changes, size, min(changes, default=float("inf")))
        if c not in self.cache and len(self.cache) >= self.cache_chunks:
            self.cache.pop(next(iter(self.cache)))
        self.cache[c] = chunk
        return chunk

    def records(self) -> list[dict[str, Any]]:
        """Every record as it stands now, oldest first (from the rendered chunks)."""
        out: list[dict[str, Any]] = []
        for c in range(0, (self.count + CHUNK - 1) // CHUNK):
            out += reversed(orjson.loads(enclose(b"", [self.chunk(c).blob], b"")))
        return out

    def page(self, top: int, floor: int, size: int, keep: ListFilter) -> tuple[list[bytes], int, int, bool]:
        """See `twilio_pages.select`."""
        return select(self.chunk, top, floor, size, keep)

    def prerender(self) -> None:
        for c in range(0, (self.count + CHUNK - 1) // CHUNK):
            self.chunk(c)
