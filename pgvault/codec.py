"""The object format: every object pgvault writes is framed, compressed, checksummed
and, when a key is configured, encrypted — streaming both ways in bounded memory.

Layout (integers big-endian)::

    header   magic "PGVAULT\\0" | version u8 | header length u16
             | compression u8 | encryption u8 | chunk size u32
             | name length u16 | name (utf-8) | key id length u8 | key id (ascii)
             | [encrypted: wrap nonce (12) | wrapped data key (48) | chunk nonce prefix (7)]
             | header check: first 8 bytes of SHA-256 of everything before it
    payload  zstd stream (or the plaintext as is)
             | trailer: "PGVTRAIL" | plaintext length u64 | plaintext SHA-256 (32)

Unencrypted, the payload follows the header as is. Encrypted, the payload is cut
into chunks of ``chunk size`` bytes, each sealed with AES-256-GCM under a random
per-object data key: nonce = prefix || chunk index u32 || final flag u8, associated
data = the whole header (which holds the object's name). Every chunk but the last
is exactly full; the last is short (possibly empty) and flagged final, so a reader
can tell truncation at a chunk boundary from a clean end. The data key is wrapped
by a *vault key* (named by key id) with the header before the wrap as associated
data; vault keys are themselves wrapped by the master key (see ``keys``), so the
master key can rotate without touching any object.

Why the name is in the header even unencrypted: an object copied or moved to
another name is then detected by every reader, not only by encrypted ones.
Why a trailer: each object carries its own plaintext length and checksum, so it
can be verified without any record (manifest) of what it should contain.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import queue
import struct
import threading
from typing import TYPE_CHECKING, BinaryIO, Iterator, NamedTuple

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import zstandard

from pgvault.errors import CorruptObjectError, EncryptionKeyError, VaultMismatchError


def AESGCM(key: bytes) -> "AESGCM":  # noqa: N802 - stands in for the class it returns an instance of
    """cryptography is imported only when an object is encrypted: an unencrypted
    archive_command never pays its start-up cost (~5 ms per call)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM

    return _AESGCM(key)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag

if TYPE_CHECKING:  # keys imports this module; only the types are needed here
    from pgvault.keys import Keyring, VaultKey

MAGIC = b"PGVAULT\0"
FORMAT_VERSION = 1
COMPRESSIONS = {"none": 0, "zstd": 1}
ENCRYPTIONS = {"none": 0, "aes-256-gcm": 1}

#: Plaintext bytes per encrypted chunk; the stored chunk adds a 16-byte tag.
CHUNK_SIZE = 1 << 20
#: Bounds a reader accepts for the header's chunk size: they bound its memory.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 12, 1 << 24
#: Bytes read from a source at a time: large, so per-call Python overhead vanishes.
BLOCK_SIZE = 1 << 20

TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7  # + 4-byte chunk index + 1-byte final flag = 12-byte GCM nonce
WRAP_NONCE_SIZE = 12
DATA_KEY_SIZE = 32
WRAPPED_KEY_SIZE = DATA_KEY_SIZE + TAG_SIZE
HEADER_CHECK_SIZE = 8
MAX_NAME_BYTES = 1024
MAX_CHUNKS = 1 << 32

_PREFIX = struct.Struct(">8sBH")  # magic, version, header length
_FIXED = struct.Struct(">BBIH")  # compression, encryption, chunk size, name length
TRAILER_MAGIC = b"PGVTRAIL"
_TRAILER = struct.Struct(">8sQ32s")
TRAILER_SIZE = _TRAILER.size


class ObjectHeader(NamedTuple):
    """What an object's header says, for readers and tools (``pgvault inspect``)."""

    version: int
    compression: str
    encryption: str
    name: str
    key_id: str
    chunk_size: int
    wrap_nonce: bytes = b""
    wrapped_key: bytes = b""
    nonce_prefix: bytes = b""
    #: The header's bytes as stored: associated data of every chunk.
    raw: bytes = b""

    def __repr__(self) -> str:  # the key material and raw bytes say nothing to a reader
        return (f"ObjectHeader(version={self.version}, compression={self.compression!r}, "
                f"encryption={self.encryption!r}, name={self.name!r}, key_id={self.key_id!r}, "
                f"chunk_size={self.chunk_size})")

    @property
    def size(self) -> int:
        """Length of the header in bytes; the payload starts right after it."""
        return len(self.raw)

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"


def _corrupt(name: str | None, what: str) -> CorruptObjectError:
    return CorruptObjectError(f"object {name or '(unnamed)'} is corrupt: {what}")


def _name_bytes(name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise ValueError("an object name is required: it is bound into the object")
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"object name longer than {MAX_NAME_BYTES} bytes: {name[:60]}...")
    return raw


def _build_header(
    *, name: str, compression: str, key: VaultKey | None, data_key: bytes | None, chunk_size: int
) -> tuple[bytes, bytes]:
    """The header bytes, and the nonce prefix of the chunks (empty when unencrypted)."""
    name_raw = _name_bytes(name)
    key_id = key.key_id.encode("ascii") if key is not None else b""
    if len(key_id) > 255:
        raise ValueError("key id longer than 255 characters")
    encrypted = key is not None
    length = (
        _PREFIX.size + _FIXED.size + len(name_raw) + 1 + len(key_id) + HEADER_CHECK_SIZE
        + ((WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE + NONCE_PREFIX_SIZE) if encrypted else 0)
    )
    head = b"".join((
        _PREFIX.pack(MAGIC, FORMAT_VERSION, length),
        _FIXED.pack(COMPRESSIONS[compression], ENCRYPTIONS["aes-256-gcm" if encrypted else "none"],
                    chunk_size if encrypted else 0, len(name_raw)),
        name_raw,
        bytes((len(key_id),)),
        key_id,
    ))
    prefix = b""
    if encrypted:
        assert key is not None and data_key is not None
        wrap_nonce = os.urandom(WRAP_NONCE_SIZE)
        # Everything before the wrap is bound to the data key: name, key id, codec.
        wrapped = AESGCM(key.secret).encrypt(wrap_nonce, data_key, head)
        prefix = os.urandom(NONCE_PREFIX_SIZE)
        head += wrap_nonce + wrapped + prefix
    head += hashlib.sha256(head).digest()[:HEADER_CHECK_SIZE]
    assert len(head) == length
    return head, prefix


def _chunk_nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _read_exact(source: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of stream (network streams may return short reads)."""
    data = source.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := source.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _ByteQueue:
    """Bytes waiting to be read, kept as the objects that produced them.

    Appending to one growing bytearray would copy every byte twice more and
    make malloc grow and trim the heap for every chunk (page faults on fresh
    memory): measurable at 1 GB/s. Here a read costs one copy, or none when it
    takes exactly one whole piece.
    """

    def __init__(self) -> None:
        self._pieces: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first piece
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, data: bytes) -> None:
        if data:
            self._pieces.append(data)
            self._size += len(data)

    def take(self, n: int) -> bytes:
        """Remove and return the first ``min(n, len(self))`` bytes."""
        n = min(n, self._size)
        if n <= 0:
            return b""
        self._size -= n
        if self._offset == 0 and len(self._pieces[0]) == n:
            return self._pieces.popleft()
        parts = []
        while n:
            head = self._pieces[0]
            take = min(n, len(head) - self._offset)
            parts.append(memoryview(head)[self._offset : self._offset + take])
            n -= take
            if self._offset + take == len(head):
                self._pieces.popleft()
                self._offset = 0
            else:
                self._offset += take
        return b"".join(parts)


def read_header(source: BinaryIO, *, name: str | None = None) -> ObjectHeader:
    """Read and check an object's header, leaving ``source`` at the payload.

    ``name`` is only used in error messages; ``decode`` also checks it against the header.
    """
    prefix = _read_exact(source, _PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[: len(MAGIC)] != MAGIC:
        if len(prefix) < _PREFIX.size and MAGIC.startswith(prefix):
            raise _corrupt(name, f"truncated: {len(prefix)} bytes, less than a header")
        raise _corrupt(name, "not a pgvault object (bad magic)")
    _, version, length = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise VaultMismatchError(
            f"object {name or '(unnamed)'} has format version {version}; this pgvault reads version {FORMAT_VERSION}",
            hint="upgrade pgvault to read objects written by a newer version",
        )
    if not _PREFIX.size + _FIXED.size + 1 + HEADER_CHECK_SIZE <= length <= 4096:
        raise _corrupt(name, f"header length {length} out of range")
    rest = _read_exact(source, length - _PREFIX.size)
    if len(rest) < length - _PREFIX.size:
        raise _corrupt(name, "truncated inside the header")
    raw = prefix + rest
    if hashlib.sha256(raw[:-HEADER_CHECK_SIZE]).digest()[:HEADER_CHECK_SIZE] != raw[-HEADER_CHECK_SIZE:]:
        raise _corrupt(name, "header checksum mismatch")
    # The check passed, so the fields below were written by an encoder; still
    # validate them, since a future or foreign writer could be inconsistent.
    try:
        compression_id, encryption_id, chunk_size, name_len = _FIXED.unpack_from(raw, _PREFIX.size)
        pos = _PREFIX.size + _FIXED.size
        stored_name = raw[pos : pos + name_len].decode("utf-8")
        pos += name_len
        key_id = raw[pos + 1 : pos + 1 + raw[pos]].decode("ascii")
        pos += 1 + raw[pos]
        compression = {v: k for k, v in COMPRESSIONS.items()}[compression_id]
        encryption = {v: k for k, v in ENCRYPTIONS.items()}[encryption_id]
    except (KeyError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise _corrupt(name, f"malformed header ({type(exc).__name__})") from None
    extra = b""
    if encryption != "none":
        if not key_id or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise _corrupt(name, "malformed header (key id or chunk size)")
        extra = raw[pos : pos + WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE + NONCE_PREFIX_SIZE]
        pos += len(extra)
    if pos != length - HEADER_CHECK_SIZE:
        raise _corrupt(name, "malformed header (length)")
    return ObjectHeader(
        version=version,
        compression=compression,
        encryption=encryption,
        name=stored_name,
        key_id=key_id,
        chunk_size=chunk_size,
        wrap_nonce=extra[:WRAP_NONCE_SIZE],
        wrapped_key=extra[WRAP_NONCE_SIZE : WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE],
        nonce_prefix=extra[WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE :],
        raw=raw,
    )


class _SizedReader(io.RawIOBase):
    """read()/readinto() over one ``_read_sized(n)``: the shape both codec streams share."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(BLOCK_SIZE * 4):
                parts.append(part)
            return b"".join(parts)
        return self._read_sized(size)

    def readinto(self, buffer) -> int:  # so io.RawIOBase helpers work too
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read_sized(self, size: int) -> bytes:
        raise NotImplementedError


class EncodingReader(_SizedReader):
    """A readable stream of the encoded object; hand it to ``Storage.put``.

    Work happens inside ``read``: one source block is read, hashed, compressed
    and sealed at a time, so memory stays at a few blocks whatever the size.
    ``read(n)`` returns exactly ``n`` bytes until the end (S3 multipart uploads
    need full parts). Once exhausted, ``plaintext_sha256`` (hex),
    ``plaintext_size`` and ``encoded_size`` are set.
    """

    def __init__(
        self, source: BinaryIO, *, name: str, compression: str, level: int, threads: int,
        key: VaultKey | None, chunk_size: int,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size} out of range")
        if not -(1 << 17) <= level <= 22 or threads < -1:
            raise ValueError(f"zstd level {level} or threads {threads} out of range (level <= 22, threads >= -1)")
        self.name = name
        self.plaintext_sha256: str | None = None
        self.plaintext_size: int | None = None
        self.encoded_size = 0
        self._source = source
        self._sha = hashlib.sha256()
        self._size = 0
        self._chunk_size = chunk_size
        self._index = 0
        self._done = False
        self._aead: AESGCM | None = None
        data_key = os.urandom(DATA_KEY_SIZE) if key is not None else None
        self._header, self._nonce_prefix = _build_header(
            name=name, compression=compression, key=key, data_key=data_key, chunk_size=chunk_size
        )
        if data_key is not None:
            self._aead = AESGCM(data_key)
        self._compression, self._level, self._threads = compression, level, threads
        self._compressor: zstandard.ZstdCompressionChunker | None = None  # made by the first _step
        self._started = False
        self._readinto = getattr(source, "readinto", None)
        self._block_view = memoryview(bytearray(BLOCK_SIZE))
        self._out = _ByteQueue()  # encoded bytes not yet returned
        self._out.put(self._header)
        self._pending = bytearray()  # payload bytes not yet sealed into a chunk

    def _read_sized(self, size: int) -> bytes:
        while len(self._out) < size and not self._done:
            self._step()
        data = self._out.take(size)
        self.encoded_size += len(data)
        return data

    def _read_block(self, *, fill: bool = False) -> bytes | memoryview:
        """The next block of the source; with ``fill``, a full block unless the source ends."""
        # readinto a reused buffer: a fresh 1 MiB object per read costs page
        # faults (measurable system time at 1 GB/s). Safe because zstd, sha256
        # and the buffers below all copy what they keep before the next read.
        if self._readinto is None:
            return _read_exact(self._source, BLOCK_SIZE) if fill else self._source.read(BLOCK_SIZE)
        view = self._block_view
        n = self._fill(view)
        while fill and 0 < n < BLOCK_SIZE and (more := self._fill(view[n:])):
            n += more
        return view[:n]

    def _fill(self, view: memoryview) -> int:
        n = self._readinto(view)
        if n is None:  # a non-blocking source with nothing ready: not the end of the object
            raise ValueError(f"object {self.name}: the source is non-blocking; give encode a blocking stream")
        return n

    def _start(self, first_block_size: int) -> None:
        if self._compression == "zstd":
            # Worker threads let zstd compress while this thread reads and
            # hashes: that is what lets encode keep up with `zstd -T2`. But only
            # for objects of more than one block: starting them costs more than
            # compressing a small object (a record, a small relation file).
            # A chunker, not a compressobj: compressobj.compress returns at most
            # one small buffer per call, so with threads its output piles up
            # inside zstd (memory growing with the object); the chunker hands
            # out everything ready.
            threads = self._threads if first_block_size == BLOCK_SIZE else 0
            self._compressor = zstandard.ZstdCompressor(level=self._level, threads=threads).chunker(
                chunk_size=self._chunk_size
            )
        self._started = True

    def _step(self) -> None:
        block = self._read_block(fill=not self._started)
        if not self._started:
            self._start(len(block))
        if block:
            self._sha.update(block)  # releases the GIL: zstd workers keep running
            self._size += len(block)
            if self._compressor is None:
                self._emit(block, final=False)
            else:
                for piece in self._compressor.compress(block):
                    self._emit(piece, final=False)
            return
        if self._compressor is not None:
            for piece in self._compressor.finish():
                self._emit(piece, final=False)
        digest = self._sha.digest()
        self._emit(_TRAILER.pack(TRAILER_MAGIC, self._size, digest), final=True)
        self.plaintext_sha256 = digest.hex()
        self.plaintext_size = self._size
        self._done = True

    def _emit(self, payload: bytes | memoryview, *, final: bool) -> None:
        if self._aead is None:
            # A view of the reused read buffer must be copied before the next read.
            self._out.put(payload if isinstance(payload, bytes) else bytes(payload))
            return
        n = self._chunk_size
        view = memoryview(payload)
        if self._pending:  # complete the partial chunk first
            take = n - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == n:
                self._seal(self._pending, final=False)
                self._pending = bytearray()
        # Whole chunks straight from the payload: the chunker hands out exactly
        # chunk-sized pieces, so usually nothing is copied before encryption.
        while len(view) >= n:
            self._seal(view[:n], final=False)
            view = view[n:]
        self._pending += view
        if final:
            # Whatever is left is shorter than a chunk (maybe empty): the final chunk.
            self._seal(self._pending, final=True)
            self._pending = bytearray()

    def _seal(self, plaintext: bytes | bytearray | memoryview, *, final: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise ValueError(f"object {self.name} is too large for the chunk counter")
        nonce = _chunk_nonce(self._nonce_prefix, self._index, final)
        self._out.put(self._aead.encrypt(nonce, plaintext, self._header))
        self._index += 1


def encode(
    source: BinaryIO,
    *,
    name: str,
    compression: str = "zstd",
    level: int = 3,
    threads: int = 2,
    key: VaultKey | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> EncodingReader:
    """Encode ``source`` as the object ``name``: returns a readable stream of the stored bytes.

    ``key`` is the vault key to encrypt with (``Keyring.current``), or None for
    no encryption. ``threads`` is zstd's worker count (0: compress in this
    thread, -1: one per CPU); objects of less than one block use none.
    After the stream is exhausted, ``.plaintext_sha256`` and ``.plaintext_size``
    hold what the caller records (e.g. in a manifest).
    """
    return EncodingReader(
        source, name=name, compression=compression, level=level, threads=threads, key=key, chunk_size=chunk_size
    )


class _Hasher:
    """SHA-256 computed in a helper thread, so decoding hashes while it decompresses.

    hashlib releases the GIL on large updates, so on two cores decode runs at
    the speed of SHA-256 rather than of SHA-256 plus zstd. Small objects
    (records, manifests) are hashed inline: a thread would cost more than it
    saves. The bounded queue bounds memory.
    """

    INLINE_BYTES = 4 << 20

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._inline = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            self._sha.update(block)

    def update(self, block: bytes) -> None:
        if self._thread is None:
            if self._inline < self.INLINE_BYTES:
                self._inline += len(block)
                self._sha.update(block)
                return
            self._thread = threading.Thread(target=self._run, name="pgvault-sha256", daemon=True)
            self._thread.start()
        self._queue.put(block)  # bytes are immutable: safe to share with the caller

    def update_now(self, data) -> None:
        """Hash ``data`` in this thread, before returning: for a buffer the caller reuses at once."""
        if self._thread is not None:
            self.close()  # what is queued comes first
            self._thread = None  # a later update() starts a new helper
        self._sha.update(data)

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Payload:
    """The payload as a readable stream, with the trailer held back.

    ``blocks`` yields the payload in pieces (decrypted chunks, or raw blocks);
    the last TRAILER_SIZE bytes are never returned by ``read`` but kept for
    ``take_trailer`` once the blocks are exhausted.
    """

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buf = _ByteQueue()
        self.exhausted = False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        # Keep more than the trailer buffered, so what we return is never trailer.
        while len(self._buf) < size + TRAILER_SIZE and not self.exhausted:
            block = next(self._blocks, None)
            if block is None:
                self.exhausted = True
            else:
                self._buf.put(block)
        return self._buf.take(max(0, min(size, len(self._buf) - TRAILER_SIZE)))

    def take_trailer(self) -> bytes:
        """What is left once the blocks are exhausted: the trailer, if the object is whole."""
        return self._buf.take(len(self._buf))


class DecodingReader(_SizedReader):
    """A readable stream of an object's plaintext, verified as it goes.

    Chunks are authenticated as they are read; the plaintext length and SHA-256
    can only be checked at the end, so the ``read`` that reaches the end raises
    CorruptObjectError *instead of* returning the final ``b""``. Bytes returned
    before that are unverified: write them to a temporary file and rename it
    into place only once ``read`` has returned ``b""``.
    """

    def __init__(
        self, source: BinaryIO, *, name: str, keyring: Keyring | None, expected_sha256: str | None,
        require_encryption: bool,
    ) -> None:
        self.name = name
        self.plaintext_sha256: str | None = None
        self.plaintext_size: int | None = None
        self._hasher = _Hasher()  # first: close() needs it even if the checks below fail
        self._source = source
        self._expected = expected_sha256.lower() if expected_sha256 else None
        self._size = 0
        self._done = False
        self._error: CorruptObjectError | None = None
        self._unhashed = False  # discard() dropped bytes without hashing them
        self._scratch: memoryview | None = None
        self.header = header = read_header(source, name=name)
        if header.name != name:
            raise _corrupt(name, f"its header names it {header.name!r}: it was moved or copied from another name")
        if header.encrypted:
            blocks = self._chunks(self._data_key(header, keyring), header)
        elif require_encryption:
            raise _corrupt(name, "it is not encrypted, but this vault requires encryption (replaced object?)")
        else:
            blocks = iter(lambda: source.read(BLOCK_SIZE), b"")
        self._payload = _Payload(blocks)
        self._stream = (
            zstandard.ZstdDecompressor().stream_reader(self._payload, read_size=BLOCK_SIZE, read_across_frames=True)
            if header.compression == "zstd"
            else self._payload
        )

    def _data_key(self, header: ObjectHeader, keyring: Keyring | None) -> AESGCM:
        if keyring is None:
            raise EncryptionKeyError(
                f"object {self.name} is encrypted with key id {header.key_id}, but no encryption key is configured",
                hint="set [encryption] key_file to the master key file of this vault",
            )
        vault_key = keyring.get(header.key_id)
        if vault_key is None:
            raise EncryptionKeyError(
                f"object {self.name} is encrypted with key id {header.key_id}, which the keyring does not hold",
                hint="use the master key file of the vault this object belongs to "
                "(after a master key rotation, the new key file)",
            )
        aad = header.raw[: header.size - HEADER_CHECK_SIZE - WRAP_NONCE_SIZE - WRAPPED_KEY_SIZE - NONCE_PREFIX_SIZE]
        try:
            data_key = AESGCM(vault_key.secret).decrypt(header.wrap_nonce, header.wrapped_key, aad)
        except _invalid_tag():
            raise _corrupt(
                self.name, f"its data key does not unwrap with vault key {header.key_id} (forged header or wrong key)"
            ) from None
        return AESGCM(data_key)

    def _chunks(self, aead: AESGCM, header: ObjectHeader) -> Iterator[bytes]:
        stored = header.chunk_size + TAG_SIZE
        for index in range(MAX_CHUNKS):
            data = _read_exact(self._source, stored)
            if not data:
                raise _corrupt(self.name, f"truncated: it ends after chunk {index - 1} without a final chunk")
            final = len(data) < stored  # only the final chunk is short
            if len(data) < TAG_SIZE:
                raise _corrupt(self.name, f"truncated inside chunk {index}")
            try:
                plaintext = aead.decrypt(_chunk_nonce(header.nonce_prefix, index, final), data, header.raw)
            except _invalid_tag():
                raise _corrupt(
                    self.name, f"authentication failed in chunk {index} (corrupt, truncated, reordered or moved)"
                ) from None
            yield plaintext
            if final:
                if self._source.read(1):
                    raise _corrupt(self.name, f"unexpected data after the final chunk {index}")
                return
        raise _corrupt(self.name, "too many chunks")

    def _read_sized(self, size: int) -> bytes:
        if self.closed:
            raise ValueError(f"object {self.name}: read from a closed reader")
        if self._error is not None:
            # Sticky: a caller that catches the error and reads on must never
            # see b"", which would look like a clean, verified end.
            raise self._error
        if self._done or size == 0:
            return b""
        try:
            data = self._stream.read(size)
            if data:
                self._hasher.update(data)
                self._size += len(data)
                return data
            self._finish()
        except zstandard.ZstdError as exc:
            self._fail(_corrupt(self.name, f"decompression failed ({exc})"))
        except CorruptObjectError as exc:
            self._fail(exc)
        return b""

    def read_into(self, buffer) -> int:
        """Fill ``buffer`` with the next plaintext bytes; fewer only at the end of the object.

        Like ``read``, but zstd decompresses straight into ``buffer`` (no
        intermediate bytes object) and the bytes are hashed before this returns,
        so the caller may reuse ``buffer`` at once. Returns the number of bytes
        filled; 0 once the end has been reached and verified. The end-of-object
        checks raise exactly as ``read``'s do.
        """
        view = memoryview(buffer).cast("B")
        readinto = getattr(self._stream, "readinto", None)
        filled = 0
        while filled < len(view):
            if self.closed:
                raise ValueError(f"object {self.name}: read from a closed reader")
            if self._error is not None:
                raise self._error
            if self._done:
                break
            try:
                if readinto is not None:
                    n = readinto(view[filled:])
                else:
                    data = self._stream.read(len(view) - filled)
                    n = len(data)
                    view[filled:filled + n] = data
                if n:
                    self._hasher.update_now(view[filled:filled + n])
                    self._size += n
                    filled += n
                else:
                    self._finish()
            except zstandard.ZstdError as exc:
                self._fail(_corrupt(self.name, f"decompression failed ({exc})"))
            except CorruptObjectError as exc:
                self._fail(exc)
        return filled

    def discard(self, n: int) -> int:
        """Decode and drop the next ``n`` plaintext bytes without hashing them; fewer only at the end.

        For a reader that stops before the object's end and checks what it
        keeps by other means (a delta restore's few blocks, each against its
        hash in the manifest): hashing what is dropped would cost more than
        decoding it. The object's checksum can then no longer be checked, so
        reaching the end afterwards raises ValueError instead of returning b"".
        """
        if self._scratch is None:
            self._scratch = memoryview(bytearray(BLOCK_SIZE))
        readinto = getattr(self._stream, "readinto", None)
        dropped = 0
        while dropped < n:
            if self.closed:
                raise ValueError(f"object {self.name}: read from a closed reader")
            if self._error is not None:
                raise self._error
            view = self._scratch[:min(n - dropped, len(self._scratch))]
            try:
                got = readinto(view) if readinto is not None else len(self._stream.read(len(view)))
            except zstandard.ZstdError as exc:
                self._fail(_corrupt(self.name, f"decompression failed ({exc})"))
            except CorruptObjectError as exc:
                self._fail(exc)
            if not got:
                break
            self._unhashed = True
            self._size += got
            dropped += got
        return dropped

    def _fail(self, error: CorruptObjectError) -> None:
        self._error = error
        self._hasher.close()
        raise error from None

    def _finish(self) -> None:
        if self._unhashed:
            raise ValueError(f"object {self.name}: bytes were discarded unhashed, so its checksum cannot be checked")
        digest = self._hasher.hexdigest()
        if self._payload.read(1) or not self._payload.exhausted:
            raise _corrupt(self.name, "unexpected data after the compressed stream")
        trailer = self._payload.take_trailer()
        if len(trailer) != TRAILER_SIZE or trailer[: len(TRAILER_MAGIC)] != TRAILER_MAGIC:
            raise _corrupt(self.name, "truncated: the trailer is missing or damaged")
        _, length, sha = _TRAILER.unpack(trailer)
        if length != self._size:
            raise _corrupt(self.name, f"truncated or damaged: {self._size} bytes decoded, the trailer says {length}")
        if sha.hex() != digest:
            raise _corrupt(self.name, f"checksum mismatch: content has sha256 {digest}, the trailer says {sha.hex()}")
        if self._expected is not None and digest != self._expected:
            raise _corrupt(self.name, f"checksum mismatch: content has sha256 {digest}, the record expects {self._expected}")
        self.plaintext_sha256 = digest
        self.plaintext_size = self._size
        self._done = True

    def close(self) -> None:
        self._hasher.close()
        super().close()


def decode(
    source: BinaryIO,
    *,
    name: str,
    keyring: Keyring | None,
    expected_sha256: str | None = None,
    require_encryption: bool = False,
) -> DecodingReader:
    """A readable stream of the plaintext of the object ``name`` read from ``source``.

    Raises CorruptObjectError (naming the object and what failed) for a damaged,
    truncated, reordered or moved object or a checksum mismatch, and
    EncryptionKeyError when the object's key is not in ``keyring`` (or there is
    no keyring). The end-of-object checks run in the ``read`` that reaches the
    end, which raises instead of returning ``b""``: write what you read to a
    temporary file and rename it only after ``b""`` (see DecodingReader).
    ``require_encryption`` refuses unencrypted objects (a replaced object).
    """
    return DecodingReader(
        source, name=name, keyring=keyring, expected_sha256=expected_sha256, require_encryption=require_encryption
    )


def encode_bytes(data: bytes, **kwargs) -> tuple[bytes, str]:
    """Encode a small object in memory: (stored bytes, plaintext sha256 hex). Keywords as ``encode``."""
    reader = encode(io.BytesIO(data), **kwargs)
    blob = reader.read()
    assert reader.plaintext_sha256 is not None
    return blob, reader.plaintext_sha256


def decode_bytes(blob: bytes, **kwargs) -> bytes:
    """Decode a small object held in memory. Keywords as ``decode``; ``keyring`` defaults to None."""
    kwargs.setdefault("keyring", None)
    with decode(io.BytesIO(blob), **kwargs) as reader:
        return reader.read()


class PreparedPayload(NamedTuple):
    """A whole plaintext hashed and compressed in memory, ready to be framed under a name.

    For objects whose name depends on their checksum (WAL keys carry it) and
    that fit in memory: hashing and compressing run at the same time on two
    cores instead of one after the other, and nothing is copied on the way.
    """

    compression: str
    payload: bytes | memoryview  # the zstd frame, or the plaintext itself
    plaintext_size: int
    plaintext_sha256: str


def prepare_payload(data: bytes | memoryview, *, compression: str, level: int, threads: int) -> PreparedPayload:
    """Hash ``data`` (in a helper thread: hashlib releases the GIL) while zstd compresses it."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    digest: list[bytes] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).digest()))
    hasher.start()
    try:
        if compression == "zstd":
            # The hasher thread takes one of the cores ``threads`` allows; zstd's own workers
            # would only compete with it on two (measured: no faster, and less steady).
            threads = threads - 1 if threads > 2 and len(data) >= BLOCK_SIZE else 0
            payload: bytes | memoryview = zstandard.ZstdCompressor(level=level, threads=threads).compress(data)
        else:
            payload = data
    finally:
        hasher.join()
    return PreparedPayload(compression, payload, len(data), digest[0].hex())


def frame_payload(prepared: PreparedPayload, *, name: str, key: VaultKey | None,
                  chunk_size: int = CHUNK_SIZE) -> list[bytes | memoryview]:
    """The stored bytes of object ``name`` holding ``prepared``: exactly what ``encode`` writes."""
    data_key = os.urandom(DATA_KEY_SIZE) if key is not None else None
    header, nonce_prefix = _build_header(
        name=name, compression=prepared.compression, key=key, data_key=data_key, chunk_size=chunk_size)
    trailer = _TRAILER.pack(TRAILER_MAGIC, prepared.plaintext_size, bytes.fromhex(prepared.plaintext_sha256))
    if data_key is None:
        return [header, prepared.payload, trailer]
    aead = AESGCM(data_key)
    body = memoryview(b"".join((prepared.payload, trailer)))
    whole = len(body) // chunk_size
    if whole >= MAX_CHUNKS:
        raise ValueError(f"object {name} is too large for the chunk counter")
    parts: list[bytes | memoryview] = [header]
    for index in range(whole):
        piece = body[index * chunk_size:(index + 1) * chunk_size]
        parts.append(aead.encrypt(_chunk_nonce(nonce_prefix, index, False), piece, header))
    # The rest, shorter than a chunk and possibly empty, is the final chunk.
    parts.append(aead.encrypt(_chunk_nonce(nonce_prefix, whole, True), body[whole * chunk_size:], header))
    return parts
