"""The storage protocol: write-once objects addressed by keys, read as byte streams.

Storage knows nothing of what the bytes mean. Keys are relative POSIX-style
paths whose components use only ``[A-Za-z0-9._-]`` and never start with a dot:
names starting with a dot are reserved for a backend's temporary files, which
listings never show.
"""

from __future__ import annotations

import re
from typing import BinaryIO, Iterator, NamedTuple, Protocol, runtime_checkable

from pgvault.errors import StorageError

_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
MAX_KEY_LENGTH = 1024

#: How many bytes backends read from a source stream at a time.
COPY_BLOCK = 1 << 20


class ObjectInfo(NamedTuple):
    """What a backend knows of one stored object."""

    key: str
    size: int


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise StorageError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise StorageError(f"invalid object key {key!r}: must be 1..{MAX_KEY_LENGTH} characters")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _COMPONENT.match(part):
            raise StorageError(
                f"invalid object key {key!r}: each '/'-separated part must match [A-Za-z0-9_-][A-Za-z0-9._-]*"
            )
    return key


def is_valid_key_part(part: str) -> bool:
    """True if ``part`` can be one '/'-separated part of a key (e.g. a cluster name)."""
    return isinstance(part, str) and len(part) <= MAX_KEY_LENGTH and _COMPONENT.match(part) is not None


def validate_prefix(prefix: str) -> str:
    """A listing prefix is empty or a key, optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or "x")
    return prefix


@runtime_checkable
class Storage(Protocol):
    """Five methods over keys and byte streams; every backend passes one contract suite."""

    #: A short human description (URL without secrets), for messages.
    description: str

    def put(self, key: str, source: BinaryIO) -> ObjectInfo:
        """Store everything read from ``source`` under ``key``, atomically and durably.

        Returns only once the object is durable (fsync'd, or acknowledged by S3).
        Write-once: if ``key`` exists with the same bytes this succeeds; with other
        bytes it raises ObjectExistsError and leaves the existing object untouched.
        Nothing partial is ever visible under ``key``.
        """
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object's bytes; ObjectNotFoundError if absent."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if it does not exist."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key; temporary names excluded."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...
