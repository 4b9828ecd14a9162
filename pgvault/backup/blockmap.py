"""Pure block bookkeeping: where each block of a file lives, what changed, and the merge-join.

No I/O here: these are the rules an incremental backup and a restore must agree
on, tested with tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from pgvault.backup.manifest import FileEntry, Source, path_key


@dataclass(frozen=True)
class Location:
    """Where one block's bytes are: an object (and its plaintext sha256) and an offset in it."""

    object: str
    sha256: str
    offset: int


def block_locations(entry: FileEntry, block_size: int) -> dict[int, Location]:
    """Block index -> location, from a file entry's sources (blocks lie back to back in a source)."""
    out = {}
    for source in entry.sources:
        for k, block in enumerate(source.blocks):
            out[block] = Location(source.object, source.sha256, source.offset + k * block_size)
    return out


def group_sources(locations: dict[int, Location], block_size: int) -> tuple[Source, ...]:
    """The fewest sources describing ``locations``: blocks back to back in one object share one.

    Block indexes in a source ascend but need not be consecutive: an
    incremental stores a file's changed blocks 3, 7 and 8 back to back.
    Sources come ordered by their first block.
    """
    runs: list[tuple[Location, list[int]]] = []
    for loc, block in sorted(((loc, b) for b, loc in locations.items()),
                             key=lambda item: (item[0].object, item[0].offset)):
        if runs:
            start, blocks = runs[-1]
            if (loc.object == start.object and loc.offset == start.offset + len(blocks) * block_size
                    and block > blocks[-1]):
                blocks.append(block)
                continue
        runs.append((loc, [block]))
    runs.sort(key=lambda run: run[1][0])
    return tuple(Source(loc.object, loc.sha256, loc.offset, tuple(blocks)) for loc, blocks in runs)


def changed_blocks(current: Sequence[str], parent: Sequence[str]) -> list[int]:
    """Indexes of blocks whose hash differs from the parent's, or that the parent did not have."""
    return [i for i, h in enumerate(current) if i >= len(parent) or parent[i] != h]


def contiguous_length(lengths: Sequence[int | None], block_size: int) -> tuple[int, int]:
    """(size, block count) of the readable start of a file, given each block's length or None if unread.

    A file that shrank while it was read yields a short block, and a block
    read after that may come from a later, regrown file: only the prefix up to
    the first short or missing block is a consistent copy (WAL replay fixes the rest).
    """
    size = 0
    for i, length in enumerate(lengths):
        if length is None or length == 0:
            return size, i
        size += length
        if length < block_size:
            return size, i + 1
    return size, len(lengths)


def merge_join(current: Iterable, parent: Iterable[FileEntry]) -> Iterator[tuple[object, FileEntry | None]]:
    """Pair each current entry (anything with ``.path``) with the parent's entry of the same path.

    Both streams come in ``path_key`` order; the parent's entries of deleted
    paths are skipped. Memory: one entry of each stream at a time.
    """
    parents = iter(parent)
    pending = next(parents, None)
    for entry in current:
        key = path_key(entry.path)
        while pending is not None and path_key(pending.path) < key:
            pending = next(parents, None)
        if pending is not None and pending.path == entry.path:
            yield entry, pending
            pending = next(parents, None)
        else:
            yield entry, None
