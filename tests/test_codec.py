"""The object format: round trips, every kind of tampering, bounded memory."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvault import codec
from pgvault.errors import CorruptObjectError, EncryptionKeyError, VaultMismatchError
from pgvault.keys import Keyring, VaultKey
from pgvault.storage.local import LocalStorage

NAME = "backups/20240101T000000/base/16384/1259"
KEY = VaultKey(key_id="0123456789abcdef", secret=bytes(range(32)), created="2024-01-01T00:00:00+00:00")
OTHER_KEY = VaultKey(key_id="fedcba9876543210", secret=bytes(32), created="2024-01-02T00:00:00+00:00")
KEYRING = Keyring([KEY])
SMALL_CHUNK = codec.MIN_CHUNK_SIZE
MiB = 1 << 20


def sample(n: int) -> bytes:
    """Half random, half repetitive: compresses, but not to nothing."""
    half = n // 2
    return os.urandom(half) + (b"pgvault " * (n // 8 + 1))[: n - half]


def decode_all(blob: bytes, *, name: str = NAME, keyring=KEYRING, read_size: int = MiB, **kw) -> bytes:
    reader = codec.decode(io.BytesIO(blob), name=name, keyring=keyring, **kw)
    parts = []
    while part := reader.read(read_size):
        parts.append(part)
    return b"".join(parts)


def encrypted_blob(data: bytes, **kw) -> bytes:
    kw.setdefault("chunk_size", SMALL_CHUNK)
    blob, _ = codec.encode_bytes(data, name=NAME, key=KEY, **kw)
    return blob


def chunk_offsets(blob: bytes) -> list[int]:
    """Start offsets of the stored chunks of an encrypted object."""
    header = codec.read_header(io.BytesIO(blob))
    stored = header.chunk_size + codec.TAG_SIZE
    return list(range(header.size, len(blob), stored))


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1 :]


def expect_corrupt(blob: bytes, what: str, **kw) -> CorruptObjectError:
    with pytest.raises(CorruptObjectError) as err:
        decode_all(blob, **kw)
    assert f"object {kw.get('name', NAME)}" in str(err.value)
    assert what in str(err.value)
    return err.value


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, codec.CHUNK_SIZE, codec.CHUNK_SIZE + 1, 5 * MiB + 123])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_round_trip(size: int, compression: str, key: VaultKey | None) -> None:
    data = sample(size)
    reader = codec.encode(io.BytesIO(data), name=NAME, compression=compression, key=key)
    assert reader.plaintext_sha256 is None
    blob = reader.read()
    assert reader.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert reader.plaintext_size == size
    assert reader.encoded_size == len(blob)
    decoder = codec.decode(io.BytesIO(blob), name=NAME, keyring=KEYRING, expected_sha256=reader.plaintext_sha256)
    assert decoder.read() == data
    assert decoder.plaintext_sha256 == reader.plaintext_sha256
    assert decoder.plaintext_size == size


def test_header_describes_object() -> None:
    header = codec.read_header(io.BytesIO(encrypted_blob(b"x")))
    assert (header.version, header.compression, header.encryption) == (1, "zstd", "aes-256-gcm")
    assert (header.name, header.key_id, header.chunk_size) == (NAME, KEY.key_id, SMALL_CHUNK)
    plain = codec.read_header(io.BytesIO(codec.encode_bytes(b"x", name="a", compression="none")[0]))
    assert (plain.encryption, plain.compression, plain.key_id, plain.encrypted) == ("none", "none", "", False)


def test_compression_shrinks_and_encryption_hides() -> None:
    data = b"SELECT 1; " * 100_000
    blob = encrypted_blob(data)
    assert len(blob) < len(data) // 50
    assert b"SELECT" not in blob


def test_exact_multiple_of_chunk_ends_with_empty_final_chunk() -> None:
    # Payload = compressed stream + trailer; make it exactly two chunks long.
    trailer = codec.TRAILER_SIZE
    data = os.urandom(2 * SMALL_CHUNK - trailer)
    blob = encrypted_blob(data, compression="none")
    offsets = chunk_offsets(blob)
    assert len(offsets) == 3 and len(blob) - offsets[-1] == codec.TAG_SIZE  # empty final chunk
    assert decode_all(blob) == data


def test_storage_put_and_open(tmp_path) -> None:
    storage = LocalStorage(str(tmp_path))
    data = sample(3 * MiB)
    encoder = codec.encode(io.BytesIO(data), name=NAME, key=KEY)
    storage.put(NAME, encoder)
    with storage.open(NAME) as stream:
        assert codec.decode(stream, name=NAME, keyring=KEYRING, expected_sha256=encoder.plaintext_sha256).read() == data


def test_each_object_uses_fresh_keys() -> None:
    assert encrypted_blob(b"same") != encrypted_blob(b"same")


def test_unencrypted_object_read_with_keyring_unless_encryption_required() -> None:
    blob, _ = codec.encode_bytes(b"data", name=NAME)
    assert decode_all(blob) == b"data"
    expect_corrupt(blob, "not encrypted", require_encryption=True)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=40_000),
    read_size=st.integers(min_value=1, max_value=20_000),
    compression=st.sampled_from(["none", "zstd"]),
    encrypted=st.booleans(),
)
def test_round_trip_property(data: bytes, read_size: int, compression: str, encrypted: bool) -> None:
    blob, sha = codec.encode_bytes(
        data, name=NAME, compression=compression, key=KEY if encrypted else None, chunk_size=SMALL_CHUNK, threads=0
    )
    assert sha == hashlib.sha256(data).hexdigest()
    assert decode_all(blob, read_size=read_size, expected_sha256=sha) == data
    # and the encoder read in small pieces gives the same object layout
    encoder = codec.encode(io.BytesIO(data), name=NAME, compression=compression, chunk_size=SMALL_CHUNK, threads=0)
    pieces = iter(lambda: encoder.read(read_size), b"")
    assert decode_all(b"".join(pieces), read_size=read_size) == data


# -- tampering -----------------------------------------------------------------

DATA = os.urandom(6 * SMALL_CHUNK)  # random: compressed, still 6+ chunks


def test_flipped_byte_in_header() -> None:
    blob = encrypted_blob(DATA)
    expect_corrupt(flip(blob, len(codec.MAGIC) + 8), "header checksum mismatch")
    plain, _ = codec.encode_bytes(DATA, name=NAME)
    expect_corrupt(flip(plain, len(codec.MAGIC) + 8), "header checksum mismatch")


def test_flipped_byte_in_middle_chunk() -> None:
    blob = encrypted_blob(DATA)
    offsets = chunk_offsets(blob)
    expect_corrupt(flip(blob, offsets[2] + 100), "authentication failed in chunk 2")


def test_flipped_byte_in_trailer() -> None:
    blob = encrypted_blob(DATA)
    expect_corrupt(flip(blob, len(blob) - codec.TAG_SIZE - 5), "authentication failed in chunk")
    for compression in ("none", "zstd"):
        plain, _ = codec.encode_bytes(DATA, name=NAME, compression=compression)
        expect_corrupt(flip(plain, len(plain) - 5), "checksum mismatch")  # inside the sha256
        expect_corrupt(flip(plain, len(plain) - 33), "the trailer says")  # inside the length


def test_flipped_byte_in_unencrypted_payload() -> None:
    data = b"a fairly compressible line of text\n" * 5000
    for compression in ("none", "zstd"):
        plain, _ = codec.encode_bytes(data, name=NAME, compression=compression)
        middle = codec.read_header(io.BytesIO(plain)).size + (len(plain) - codec.TRAILER_SIZE) // 3
        expect_corrupt(flip(plain, middle), "")


def test_truncated_at_chunk_boundary() -> None:
    blob = encrypted_blob(DATA)
    offsets = chunk_offsets(blob)
    expect_corrupt(blob[: offsets[-1]], f"truncated: it ends after chunk {len(offsets) - 2} without a final chunk")
    expect_corrupt(blob[: offsets[3]], "truncated: it ends after chunk 2")
    expect_corrupt(blob[: offsets[0]], "truncated: it ends after chunk -1")


def test_truncated_mid_chunk() -> None:
    blob = encrypted_blob(DATA)
    offsets = chunk_offsets(blob)
    expect_corrupt(blob[: offsets[3] + 1000], "authentication failed in chunk 3 (corrupt, truncated")
    expect_corrupt(blob[: offsets[3] + 5], "truncated inside chunk 3")
    expect_corrupt(blob[:20], "truncated inside the header")
    expect_corrupt(blob[:5], "truncated: 5 bytes")


def test_truncated_unencrypted() -> None:
    for compression in ("none", "zstd"):
        plain, _ = codec.encode_bytes(DATA, name=NAME, compression=compression)
        expect_corrupt(plain[: len(plain) // 2], "truncated")
        expect_corrupt(plain[:-1], "truncated")


def test_swapped_chunks() -> None:
    blob = encrypted_blob(DATA)
    o = chunk_offsets(blob)
    swapped = blob[: o[1]] + blob[o[2] : o[3]] + blob[o[1] : o[2]] + blob[o[3] :]
    assert len(swapped) == len(blob)
    expect_corrupt(swapped, "authentication failed in chunk 1 (corrupt, truncated, reordered or moved)")


def test_dropped_chunk() -> None:
    blob = encrypted_blob(DATA)
    o = chunk_offsets(blob)
    expect_corrupt(blob[: o[1]] + blob[o[2] :], "authentication failed in chunk 1")


def test_chunk_from_another_object_with_same_key() -> None:
    blob, other = encrypted_blob(DATA), encrypted_blob(DATA)
    o = chunk_offsets(blob)
    assert chunk_offsets(other) == o
    expect_corrupt(blob[: o[1]] + other[o[1] : o[2]] + blob[o[2] :], "authentication failed in chunk 1")


def test_trailing_garbage() -> None:
    blob = encrypted_blob(DATA)
    # The extra byte joins the short final chunk, which then fails to authenticate.
    expect_corrupt(blob + b"x", f"authentication failed in chunk {len(chunk_offsets(blob)) - 1}")
    plain, _ = codec.encode_bytes(DATA, name=NAME, compression="zstd")
    expect_corrupt(plain[: -codec.TRAILER_SIZE] + b"garbage!" + plain[-codec.TRAILER_SIZE :], "")


def test_moved_to_another_name() -> None:
    for key in (None, KEY):
        blob, _ = codec.encode_bytes(DATA, name=NAME, key=key)
        err = expect_corrupt(blob, f"its header names it {NAME!r}: it was moved", name="wal/000000010000000000000001")
        assert "object wal/000000010000000000000001 is corrupt" in str(err)


def test_forged_header_name_fails_authentication() -> None:
    """Rewriting the name inside the header (and its check) is caught by the key wrap."""
    blob = encrypted_blob(DATA)
    header = codec.read_header(io.BytesIO(blob))
    forged_name = NAME[:-1] + "X"
    raw = header.raw.replace(NAME.encode(), forged_name.encode())
    raw = raw[: -codec.HEADER_CHECK_SIZE] + hashlib.sha256(raw[: -codec.HEADER_CHECK_SIZE]).digest()[:8]
    expect_corrupt(raw + blob[header.size :], "does not unwrap", name=forged_name)


def test_bad_magic_and_future_version() -> None:
    blob = encrypted_blob(b"x")
    expect_corrupt(b"PK\x03\x04" + blob[4:], "not a pgvault object (bad magic)")
    future = blob[: len(codec.MAGIC)] + b"\x02" + blob[len(codec.MAGIC) + 1 :]
    with pytest.raises(VaultMismatchError, match=f"object {NAME} has format version 2"):
        decode_all(future)


def test_wrong_key() -> None:
    with pytest.raises(EncryptionKeyError) as err:
        decode_all(encrypted_blob(DATA), keyring=Keyring([OTHER_KEY]))
    assert str(err.value) == (
        f"object {NAME} is encrypted with key id {KEY.key_id}, which the keyring does not hold"
    )
    assert err.value.hint


def test_encrypted_object_without_keyring() -> None:
    with pytest.raises(EncryptionKeyError, match=f"object {NAME} is encrypted with key id {KEY.key_id}, but no"):
        decode_all(encrypted_blob(DATA), keyring=None)


def test_same_key_id_other_secret() -> None:
    impostor = VaultKey(key_id=KEY.key_id, secret=bytes(32), created=KEY.created)
    expect_corrupt(encrypted_blob(DATA), "does not unwrap", keyring=Keyring([impostor]))


def test_expected_sha256_mismatch() -> None:
    blob, sha = codec.encode_bytes(DATA, name=NAME, key=KEY)
    wrong = hashlib.sha256(b"something else").hexdigest()
    expect_corrupt(blob, f"the record expects {wrong}", expected_sha256=wrong)
    assert decode_all(blob, expected_sha256=sha.upper()) == DATA


def test_error_raised_before_the_final_empty_read() -> None:
    """Streaming readers see the error instead of a clean end of file."""
    plain, _ = codec.encode_bytes(DATA, name=NAME, compression="none")
    reader = codec.decode(io.BytesIO(flip(plain, len(plain) - 1)), name=NAME, keyring=None)
    got = b""
    with pytest.raises(CorruptObjectError, match="checksum mismatch"):
        while part := reader.read(10_000):
            got += part
    assert got == DATA  # every byte was delivered, but the end never was


def test_error_is_sticky() -> None:
    """A caller that catches the error and reads on never gets a clean end of file."""
    plain, _ = codec.encode_bytes(DATA, name=NAME, compression="none")
    reader = codec.decode(io.BytesIO(flip(plain, len(plain) - 1)), name=NAME, keyring=None)
    with pytest.raises(CorruptObjectError):
        reader.read()
    with pytest.raises(CorruptObjectError, match="checksum mismatch"):
        reader.read(10)
    assert reader.plaintext_sha256 is None


class Trickle:
    """A pipe-like source: short reads, as from pg_dump's stdout."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else len(self.data), self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def readinto(self, buffer) -> int:
        out = self.read(len(buffer))
        buffer[: len(out)] = out
        return len(out)


class TrickleReadOnly:
    """The same without readinto (the encoder then uses read)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.read = Trickle(data, step).read


@pytest.mark.parametrize("size", [0, 100_000, 3 * MiB + 7])
@pytest.mark.parametrize("kind", [Trickle, TrickleReadOnly])
def test_short_reads_from_source(size: int, kind) -> None:
    data = sample(size)
    encoder = codec.encode(kind(data, 65536), name=NAME, key=KEY)
    assert decode_all(encoder.read(), expected_sha256=hashlib.sha256(data).hexdigest()) == data
    assert encoder.plaintext_size == size


def test_non_blocking_source_refused() -> None:
    class NonBlocking(io.RawIOBase):
        def readinto(self, buffer):
            return None

    with pytest.raises(ValueError, match="non-blocking"):
        codec.encode(NonBlocking(), name=NAME).read()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        codec.encode(io.BytesIO(b""), name=NAME, compression="gzip")
    with pytest.raises(ValueError, match="name is required"):
        codec.encode(io.BytesIO(b""), name="")


# -- bounded memory --------------------------------------------------------------


class LazySource:
    """``total`` bytes generated on demand: half random, half repetitive, per block."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else self.left, self.left, MiB)
        block = sample(n)
        self.sha.update(block)
        self.left -= n
        return block


def test_memory_is_bounded(tmp_path) -> None:
    total = 64 * MiB
    path = tmp_path / "object"
    source = LazySource(total)
    tracemalloc.start()
    try:
        encoder = codec.encode(source, name=NAME, key=KEY)
        with open(path, "wb") as out:
            while block := encoder.read(MiB):
                out.write(block)
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with open(path, "rb") as stored:
            decoder = codec.decode(stored, name=NAME, keyring=KEYRING, expected_sha256=source.sha.hexdigest())
            size = 0
            while block := decoder.read(MiB):
                size += len(block)
        decode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert encoder.plaintext_size == size == total
    assert encode_peak < 40 * MiB, encode_peak
    assert decode_peak < 40 * MiB, decode_peak


def test_trailer_layout_is_stable() -> None:
    """The trailer is part of the format: magic, u64 length, sha256."""
    plain, sha = codec.encode_bytes(b"abc", name=NAME, compression="none")
    magic, length, digest = struct.unpack(">8sQ32s", plain[-codec.TRAILER_SIZE :])
    assert (magic, length, digest.hex()) == (b"PGVTRAIL", 3, sha)


def framed(data: bytes, *, compression: str, key: VaultKey | None, chunk_size: int = SMALL_CHUNK) -> tuple[bytes, str]:
    prepared = codec.prepare_payload(data, compression=compression, level=1, threads=2)
    return b"".join(codec.frame_payload(prepared, name=NAME, key=key, chunk_size=chunk_size)), prepared.plaintext_sha256


@pytest.mark.parametrize("size", [0, 1, 4095, SMALL_CHUNK * 3 + 17, 2 * MiB + 5])
@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("key", [None, KEY])
def test_in_memory_framing_reads_back_like_a_streamed_object(size: int, compression: str,
                                                             key: VaultKey | None) -> None:
    data = sample(size)
    blob, sha = framed(data, compression=compression, key=key)
    assert sha == hashlib.sha256(data).hexdigest()
    assert decode_all(blob, expected_sha256=sha, require_encryption=key is not None) == data
    header = codec.read_header(io.BytesIO(blob))
    streamed = codec.read_header(io.BytesIO(codec.encode_bytes(
        data, name=NAME, compression=compression, key=key, chunk_size=SMALL_CHUNK)[0]))
    assert (header.compression, header.encryption, header.chunk_size, header.name) == \
        (streamed.compression, streamed.encryption, streamed.chunk_size, streamed.name)


def test_in_memory_framing_ends_an_exact_multiple_with_an_empty_final_chunk() -> None:
    data = os.urandom(2 * SMALL_CHUNK - codec.TRAILER_SIZE)
    blob, _ = framed(data, compression="none", key=KEY)
    offsets = chunk_offsets(blob)
    assert len(offsets) == 3 and len(blob) - offsets[-1] == codec.TAG_SIZE
    assert decode_all(blob) == data


def test_in_memory_framing_detects_tampering() -> None:
    blob, _ = framed(sample(3 * SMALL_CHUNK), compression="zstd", key=KEY)
    expect_corrupt(flip(blob, chunk_offsets(blob)[1] + 5), "authentication")
    plain, _ = framed(sample(3 * SMALL_CHUNK), compression="zstd", key=None)
    with pytest.raises(CorruptObjectError):
        decode_all(flip(plain, len(plain) - 3))
