"""Twilio's replaced streams: the account's incoming phone numbers, and phone number prices per country."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from floe.core.stream import MONEY, Batch, State, Stream
from floe.infra.http import PageGuard
from floe.sources.twilio_records import NUMBERS, S, meta_fields, to_money

if TYPE_CHECKING:
    from floe.sources.twilio import TwilioSource


class IncomingPhoneNumbers(Stream):
    name = "incoming_phone_numbers"
    primary_key = ("sid",)
    disposition = "replace"
    run_columns = ("when_retrieved",)

    def __init__(self, source: TwilioSource) -> None:
        self.source = source
        self.parser = source.parser(self.name, NUMBERS)
        self.schema = self.parser.schema

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        params = {"PageSize": str(self.source.config.page_size)}
        async for batch in self.source.pages(self.source.list_url("IncomingPhoneNumbers"), params, self.parser,
                                             self.name):
            yield Batch(self.parser.convert(batch))
        yield Batch(None, {"retrieved_at": self.source.when_retrieved.isoformat()})


PRICING_SCHEMA = pa.schema([*meta_fields(), pa.field("country", S), pa.field("iso_country", S),
                            pa.field("price_unit", S), pa.field("number_type", S), pa.field("base_price", MONEY),
                            pa.field("current_price", MONEY)])


class PricingPhoneNumbers(Stream):
    """One row per country x number type, from every page of the countries list."""

    name = "pricing_phone_numbers"
    primary_key = ("iso_country", "number_type")
    disposition = "replace"
    run_columns = ("when_retrieved",)
    schema = PRICING_SCHEMA

    def __init__(self, source: TwilioSource) -> None:
        self.source = source

    async def countries(self) -> list[str]:
        http = self.source.http
        guard = PageGuard(self.source.name, "pricing countries")
        url: str | None = f"{self.source.pricing_url}/v1/PhoneNumbers/Countries?PageSize=1000"
        isos: list[str] = []
        while url:
            page = await http.get_json(url)
            isos += [c["iso_country"] for c in page.get("countries") or []]
            url = (page.get("meta") or {}).get("next_page_url")
            guard.check(url)
        return isos

    async def read(self, state: State | None) -> AsyncIterator[Batch]:
        http = self.source.http
        isos = await self.countries()
        details = await asyncio.gather(
            *(http.get_json(f"{self.source.pricing_url}/v1/PhoneNumbers/Countries/{iso}") for iso in isos)
        )
        rows = [
            {"channel_name": self.source.name, "when_retrieved": self.source.when_retrieved,
             "country": d.get("country"), "iso_country": d.get("iso_country"), "price_unit": d.get("price_unit"),
             "number_type": p.get("number_type"), "base_price": _text(p.get("base_price")),
             "current_price": _text(p.get("current_price"))}
            for d in details for p in d.get("phone_number_prices") or []
        ]
        text = pa.RecordBatch.from_pylist(rows, schema=pa.schema([f.with_type(S) if f.type == MONEY else f
                                                                  for f in PRICING_SCHEMA]))
        yield Batch(pa.RecordBatch.from_arrays(
            [to_money(c, f.name) if f.type == MONEY else c for c, f in zip(text.columns, PRICING_SCHEMA, strict=True)],
            schema=PRICING_SCHEMA))
        yield Batch(None, {"retrieved_at": self.source.when_retrieved.isoformat(), "countries": len(isos)})


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)