"""The Twilio emulator's list pages: rendered chunks of records and the filters a list request applies.

A chunk keeps, next to its rendered bytes, the fields filters look at as numpy arrays, so that a page
is chosen with a few array operations per chunk and cut from the chunks' bytes in runs of consecutive
records (no per-record Python: the emulator must serve far faster than a client can read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

CHUNK = 1000
Meta = tuple[int | None, int, str, int | None]  # (cursor, date_created, status, end_time) as epoch seconds


@dataclass
class Chunk:
    blob: bytes  # the records, newest first, joined by ","
    starts: list[int]  # offset of each record in `blob`, plus the end
    meta: list[Meta]  # what filters look at, per record (newest first)
    changes: list[float]  # when each record next changes (inf: never)
    size: int  # records in the chunk when rendered (the newest chunk grows)
    valid_until: float  # the clock at which one of its records next changes
    cursor: np.ndarray = field(init=False, repr=False)  # epoch seconds, 0 where `has_cursor` is False
    has_cursor: np.ndarray = field(init=False, repr=False)
    end: np.ndarray = field(init=False, repr=False)
    has_end: np.ndarray = field(init=False, repr=False)
    status: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cursor = np.array([m[0] or 0 for m in self.meta], np.int64)
        self.has_cursor = np.array([m[0] is not None for m in self.meta], bool)
        self.end = np.array([m[3] or 0 for m in self.meta], np.int64)
        self.has_end = np.array([m[3] is not None for m in self.meta], bool)
        self.status = np.array([m[2] for m in self.meta], str)


@dataclass
class ListFilter:
    """Which records a list request returns: cursor and end time bounds [from, to), a status, soft-deleted ones."""

    cursor_from: int | None = None
    cursor_to: int | None = None
    end_from: int | None = None
    end_to: int | None = None
    status: str | None = None
    include_deleted: bool = False

    def mask(self, chunk: Chunk) -> np.ndarray:
        """Which records of `chunk` (newest first) the request returns."""
        keep = np.ones(len(chunk.meta), bool)
        if not self.include_deleted:
            keep &= chunk.status != "deleted"
        if self.status is not None:
            keep &= chunk.status == self.status
        for values, known, lo, hi in ((chunk.cursor, chunk.has_cursor, self.cursor_from, self.cursor_to),
                                      (chunk.end, chunk.has_end, self.end_from, self.end_to)):
            if lo is None and hi is None:
                continue
            keep &= known  # a date filter never returns a record whose date is null
            if lo is not None:
                keep &= values >= lo
            if hi is not None:
                keep &= values < hi
        return keep


def select(chunk_at: Callable[[int], Chunk], top: int, floor: int, size: int,
           keep: ListFilter) -> tuple[list[bytes], int, int, bool]:
    """Up to `size` records that `keep` accepts, from index `top - 1` down to `floor`, newest first:
    (runs of records, each runs' records joined by ",", how many, index of the last one taken,
    whether another one follows). `enclose` makes the JSON document."""
    parts: list[bytes] = []
    taken, last = 0, top
    i = top - 1
    while i >= floor:
        c = i // CHUNK
        chunk = chunk_at(c)
        newest = c * CHUNK + chunk.size - 1
        lowest = max(floor, c * CHUNK)
        first = newest - i  # positions in the chunk run newest first
        positions = np.flatnonzero(keep.mask(chunk)[first:newest - lowest + 1]) + first
        more = taken + len(positions) > size
        positions = positions[:size - taken]
        if len(positions):
            breaks = np.flatnonzero(np.diff(positions) != 1)
            run_starts = positions[np.concatenate(([0], breaks + 1))]
            run_ends = positions[np.concatenate((breaks, [len(positions) - 1]))]
            parts += [chunk.blob[chunk.starts[a]:chunk.starts[b + 1] - 1]
                      for a, b in zip(run_starts.tolist(), run_ends.tolist(), strict=True)]
            taken, last = taken + len(positions), newest - int(positions[-1])
        if more:
            return parts, taken, last, True
        i = lowest - 1
    return parts, taken, last, False


def enclose(head: bytes, runs: list[bytes], tail: bytes) -> bytes:
    """`head` + the runs as a JSON array + `tail`, copied once (a page is megabytes)."""
    pieces = [head + b"["]
    for run in runs:
        pieces += (run, b",")
    if runs:
        pieces.pop()
    pieces.append(b"]" + tail)
    return b"".join(pieces)
