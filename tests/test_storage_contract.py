"""One contract for every Storage backend: each test runs on a local directory and on S3.

The S3 runs talk HTTP to a real endpoint (moto's server, or MinIO when
PGVAULT_TEST_S3_ENDPOINT is set); nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from pgvault.errors import ObjectExistsError, ObjectNotFoundError, StorageError
from pgvault.storage import Storage
from pgvault.storage.local import TEMP_PREFIX, LocalStorage
from pgvault.storage.s3 import MIN_PART_SIZE, S3Storage
from tests.fixtures.s3server import make_client

MiB = 1 << 20
#: The S3 backend runs with S3's smallest part size, so multipart paths are exercised cheaply.
PART = MIN_PART_SIZE


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(str(tmp_path / "vault" / "cluster1"))
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(
        bucket=bucket,
        prefix="vault/cluster1",
        endpoint_url=endpoint.url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=endpoint.secret_key,
        part_size=PART,
    )


class Generated:
    """A readable stream of ``size`` deterministic bytes, made on the fly (never all in memory).

    Each MiB starts with its index and the seed, so swapped or repeated parts change the
    content. Reads stop at MiB boundaries (short reads, as from a pipe). With ``fail_at``
    set, the read that would pass that offset raises OSError instead.
    """

    _base = os.urandom(MiB)

    def __init__(self, size: int, *, seed: int = 0, fail_at: int | None = None) -> None:
        self.size, self.seed, self.fail_at, self.pos = size, seed, fail_at, 0

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError(5, "Input/output error (simulated)")
        index, offset = divmod(self.pos, MiB)
        end = min(self.size, (index + 1) * MiB)
        if n >= 0:
            end = min(end, self.pos + n)
        block = index.to_bytes(8, "big") + self.seed.to_bytes(8, "big") + self._base[16:]
        data = block[offset : offset + (end - self.pos)]
        self.pos += len(data)
        return data


def sha256_of(stream) -> str:
    digest = hashlib.sha256()
    while block := stream.read(MiB):
        digest.update(block)
    return digest.hexdigest()


def put_bytes(storage: Storage, key: str, data: bytes):
    import io

    return storage.put(key, io.BytesIO(data))


def read_all(storage: Storage, key: str) -> bytes:
    with storage.open(key) as f:
        return f.read()


def keys(storage: Storage, prefix: str = "") -> list[str]:
    return [info.key for info in storage.list(prefix)]


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, PART, PART + 1, 20 * MiB],
    ids=["empty", "1B", "1000B", "one-full-part", "part-plus-1", "20MiB"],
)
def test_put_open_round_trip(storage, size):
    info = storage.put("wal/000000010000000000000001", Generated(size))
    assert info.key == "wal/000000010000000000000001"
    assert info.size == size
    with storage.open("wal/000000010000000000000001") as f:
        assert sha256_of(f) == sha256_of(Generated(size))
    assert storage.stat("wal/000000010000000000000001").size == size


def test_open_reads_in_pieces(storage):
    put_bytes(storage, "a", b"0123456789")
    with storage.open("a") as f:
        assert f.read(3) == b"012"
        assert f.read(4) == b"3456"
        assert f.read() == b"789"
        assert f.read(1) == b""


def test_stat_present_and_absent(storage):
    put_bytes(storage, "backups/b1/manifest.json", b"{}")
    assert storage.stat("backups/b1/manifest.json").size == 2
    assert storage.stat("backups/b1/missing") is None
    assert storage.stat("nowhere/at/all") is None


def test_open_missing_raises_not_found(storage):
    with pytest.raises(ObjectNotFoundError, match=r"^object wal/nope not found in "):
        storage.open("wal/nope")


# -- listing --------------------------------------------------------------------


def test_list_by_prefix_sorted(storage):
    for key in ["wal/b", "wal/a", "walrus", "backups/x/1", "wal/sub/c", "zz"]:
        put_bytes(storage, key, key.encode())
    assert keys(storage) == ["backups/x/1", "wal/a", "wal/b", "wal/sub/c", "walrus", "zz"]
    assert keys(storage, "wal/") == ["wal/a", "wal/b", "wal/sub/c"]
    assert keys(storage, "wal") == ["wal/a", "wal/b", "wal/sub/c", "walrus"]
    assert keys(storage, "wal/s") == ["wal/sub/c"]
    assert keys(storage, "nothing/") == []
    assert [i.size for i in storage.list("wal/")] == [5, 5, 9]


def test_list_order_is_key_order_across_directories(storage):
    # '-' and '.' sort before '/', so "a-c" comes before everything under "a/".
    for key in ["a/b/z", "a-c", "a.d", "a0", "a/b-x/y", "a/b.c"]:
        put_bytes(storage, key, b"x")
    listed = keys(storage)
    assert listed == sorted(listed)
    assert listed == ["a-c", "a.d", "a/b-x/y", "a/b.c", "a/b/z", "a0"]


def test_list_rejects_invalid_prefix(storage):
    with pytest.raises(StorageError):
        list(storage.list("../"))


def test_list_and_stat_ignore_temporary_objects(storage, request):
    put_bytes(storage, "wal/a", b"a")
    if isinstance(storage, LocalStorage):
        with open(os.path.join(storage.root, "wal", f"{TEMP_PREFIX}b.123.abcd"), "wb") as f:
            f.write(b"half")
    else:
        # S3's "temporary objects" are unfinished multipart uploads; a dot name
        # written by some other tool is skipped too.
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        client = make_client(endpoint)
        upload = client.create_multipart_upload(Bucket=bucket, Key="vault/cluster1/wal/b")
        client.upload_part(
            Bucket=bucket, Key="vault/cluster1/wal/b", UploadId=upload["UploadId"], PartNumber=1, Body=b"half"
        )
        client.put_object(Bucket=bucket, Key=f"vault/cluster1/wal/{TEMP_PREFIX}c", Body=b"x")
    assert keys(storage) == ["wal/a"]
    assert keys(storage, "wal/") == ["wal/a"]
    assert storage.stat("wal/b") is None


# -- write-once -----------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 2 * PART + 7], ids=["small", "multipart"])
def test_put_same_bytes_twice_is_ok(storage, size):
    storage.put("wal/x", Generated(size))
    info = storage.put("wal/x", Generated(size))
    assert info.size == size
    assert keys(storage) == ["wal/x"]
    with storage.open("wal/x") as f:
        assert sha256_of(f) == sha256_of(Generated(size))


@pytest.mark.parametrize("size", [100, 2 * PART + 7], ids=["small", "multipart"])
def test_put_different_bytes_raises_and_keeps_original(storage, size):
    storage.put("wal/x", Generated(size, seed=1))
    with pytest.raises(ObjectExistsError) as caught:
        storage.put("wal/x", Generated(size, seed=2))
    assert caught.value.message == (
        f"object wal/x already exists in {storage.description} with different content; "
        "objects are write-once and are never overwritten"
    )
    with storage.open("wal/x") as f:
        assert sha256_of(f) == sha256_of(Generated(size, seed=1))


def test_put_different_size_raises(storage):
    put_bytes(storage, "k", b"short")
    with pytest.raises(ObjectExistsError):
        put_bytes(storage, "k", b"longer content")
    assert read_all(storage, "k") == b"short"


# -- failures leave nothing -----------------------------------------------------


@pytest.mark.parametrize("fail_at", [MiB, 2 * PART + MiB], ids=["first-part", "after-two-parts"])
def test_failing_source_leaves_nothing(storage, request, fail_at):
    with pytest.raises(StorageError, match=r"^cannot write wal/x in .*Input/output error"):
        storage.put("wal/x", Generated(4 * PART, fail_at=fail_at))
    assert storage.stat("wal/x") is None
    assert keys(storage) == []
    with pytest.raises(ObjectNotFoundError):
        storage.open("wal/x")
    if isinstance(storage, S3Storage):
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        assert make_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    else:
        assert os.listdir(os.path.join(storage.root, "wal")) == []
    # The key is still free for a complete write.
    storage.put("wal/x", Generated(1000))
    assert storage.stat("wal/x").size == 1000


# -- delete ---------------------------------------------------------------------


def test_delete(storage):
    put_bytes(storage, "dumps/d1/db.dump", b"data")
    storage.delete("dumps/d1/db.dump")
    assert storage.stat("dumps/d1/db.dump") is None
    assert keys(storage) == []
    # Deleted keys can be written again (retention removes, backups re-create).
    put_bytes(storage, "dumps/d1/db.dump", b"other")
    assert read_all(storage, "dumps/d1/db.dump") == b"other"


def test_delete_missing_is_ok(storage):
    storage.delete("never/was")
    storage.delete("x")


# -- keys -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", ".hidden", "", "a/", "a/./b", "a/../b", "sp ace", "a/.tmp.x"])
def test_invalid_keys_are_rejected(storage, key):
    with pytest.raises(StorageError, match=r"^invalid object key"):
        put_bytes(storage, key, b"x")
    with pytest.raises(StorageError, match=r"^invalid object key"):
        storage.open(key)
    with pytest.raises(StorageError, match=r"^invalid object key"):
        storage.stat(key)
    with pytest.raises(StorageError, match=r"^invalid object key"):
        storage.delete(key)
    assert keys(storage) == []


def test_description_names_the_vault(storage):
    if isinstance(storage, S3Storage):
        assert storage.description == f"s3://{storage.bucket}/vault/cluster1"
    else:
        assert storage.description == f"file://{storage.root}"


# -- S3 only --------------------------------------------------------------------


@pytest.mark.integration
def test_s3_streamed_put_memory_is_bounded(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = S3Storage(
        bucket=bucket,
        endpoint_url=endpoint.url,
        access_key_id=endpoint.access_key,
        secret_access_key=endpoint.secret_key,
        part_size=PART,
    )
    tracemalloc.start()
    try:
        storage.put("big", Generated(40 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * PART, f"peak {peak / MiB:.1f} MiB for a 40 MiB put"
    assert storage.stat("big").size == 40 * MiB


@pytest.mark.integration
def test_s3_empty_prefix_and_sse(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = S3Storage(
        bucket=bucket,
        endpoint_url=endpoint.url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=endpoint.secret_key,
        sse="AES256",
        part_size=PART,
    )
    assert storage.description == f"s3://{bucket}"
    put_bytes(storage, "top", b"small")
    storage.put("wal/big", Generated(PART + 1))
    client = make_client(endpoint)
    assert client.head_object(Bucket=bucket, Key="top")["ServerSideEncryption"] == "AES256"
    assert client.head_object(Bucket=bucket, Key="wal/big")["ServerSideEncryption"] == "AES256"
    assert keys(storage) == ["top", "wal/big"]


@pytest.mark.integration
def test_s3_through_open_storage(s3_bucket):
    from pgvault.storage import open_storage

    endpoint, bucket = s3_bucket
    storage = open_storage(
        f"s3://{bucket}/vaults/",
        cluster="main",
        endpoint_url=endpoint.url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=endpoint.secret_key,
    )
    assert storage.description == f"s3://{bucket}/vaults/main"
    put_bytes(storage, "vault.json", b"{}")
    assert make_client(endpoint).get_object(Bucket=bucket, Key="vaults/main/vault.json")["Body"].read() == b"{}"
