"""Reading an object of a store as a seekable binary file, by ranged requests (no local copy).

Sequential reads fetch `chunk` bytes per request; a seek (zip files read their directory at the end
first) just moves the position. Every request names the object's ETag as listed, so an object
rewritten while it is read fails the read instead of mixing two versions.
"""

from __future__ import annotations

import io
from typing import IO, cast

from floe.infra.objectstore import ObjectInfo, ObjectStore

CHUNK = 8 << 20  # bytes per request


class ObjectReader(io.RawIOBase):
    """The bytes of one listed object, fetched on demand."""

    def __init__(self, store: ObjectStore, info: ObjectInfo) -> None:
        self.store, self.info = store, info
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.info.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        end = min(self.info.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        data = self.store.read_range(self.info.key, self.position, end, self.info.etag)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_object(store: ObjectStore, info: ObjectInfo, chunk: int = CHUNK) -> IO[bytes]:
    """A buffered, seekable binary file over the object (closing it closes nothing remote)."""
    return cast(IO[bytes], io.BufferedReader(ObjectReader(store, info), buffer_size=chunk))
