"""Master key files, vault keys in the vault, and master key rotation."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from pgvault import codec, keys
from pgvault.errors import CorruptObjectError, EncryptionKeyError
from pgvault.keys import Keyring, VaultKey
from pgvault.storage.local import LocalStorage


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(str(tmp_path / "vault"))


def master(tmp_path, name: str = "master.key") -> keys.MasterKey:
    return keys.generate_master_key_file(str(tmp_path / name))


# -- master key files -------------------------------------------------------------


def test_generate_and_load(tmp_path) -> None:
    path = str(tmp_path / "master.key")
    generated = keys.generate_master_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = json.loads(open(path).read())
    assert (doc["format"], doc["algorithm"], doc["key_id"]) == (1, "AES-256-GCM", generated.key_id)
    loaded = keys.load_master_key(path)
    assert loaded == generated and len(loaded.secret) == 32 and loaded.path == path
    assert "secret" not in repr(loaded) and doc["key"] not in repr(loaded)


def test_generate_refuses_to_overwrite(tmp_path) -> None:
    path = tmp_path / "master.key"
    path.write_text("precious")
    with pytest.raises(EncryptionKeyError, match=f"key file {path} already exists; refusing to overwrite it"):
        keys.generate_master_key_file(str(path))
    assert path.read_text() == "precious"


def test_generate_ignores_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        path = master(tmp_path).path
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_refuses_open_permissions(tmp_path, mode: int) -> None:
    path = master(tmp_path).path
    os.chmod(path, mode)
    with pytest.raises(EncryptionKeyError) as err:
        keys.load_master_key(path)
    assert str(err.value) == (
        f"key file {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )


def test_load_accepts_0400(tmp_path) -> None:
    path = master(tmp_path).path
    os.chmod(path, 0o400)
    assert keys.load_master_key(path).path == path


def test_load_missing(tmp_path) -> None:
    path = str(tmp_path / "nope.key")
    with pytest.raises(EncryptionKeyError, match=f"key file {path} does not exist"):
        keys.load_master_key(path)


def test_load_directory(tmp_path) -> None:
    with pytest.raises(EncryptionKeyError, match="is not a regular file"):
        keys.load_master_key(str(tmp_path))


#: Loads a key file in a fresh interpreter and prints the error's exit code, message and hint.
LOAD_AND_REPORT = """
import sys
from pgvault.errors import EncryptionKeyError
from pgvault.keys import load_master_key
try:
    load_master_key(sys.argv[1])
    print("loaded")
except EncryptionKeyError as exc:
    print(exc.exit_code, exc.message, exc.hint, sep="\\n")
"""


def test_load_unreadable() -> None:
    # root reads any file, so as root the key is loaded by postgres (as archive_command would)
    # from a file of root's; otherwise by this user from a file of mode 0000.
    from tests.fixtures.pgcluster import PG_USER

    directory = tempfile.mkdtemp(prefix="pgvault-keys-", dir="/tmp")
    try:
        os.chmod(directory, 0o755)
        path = keys.generate_master_key_file(os.path.join(directory, "master.key")).path
        as_root = os.geteuid() == 0
        if not as_root:
            os.chmod(path, 0)
        out = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, path], user=PG_USER if as_root else None,
                             cwd="/tmp", capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(directory)
    assert out.splitlines() == [
        "11",
        f"cannot read key file {path}: Permission denied",
        "the user running pgvault (for archive_command: postgres) must own the key file",
    ]


def write_key_file(tmp_path, content: str) -> str:
    path = tmp_path / "bad.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    return str(path)


def good_doc() -> dict:
    secret = os.urandom(32)
    return {
        "format": 1,
        "algorithm": "AES-256-GCM",
        "key_id": keys.master_key_id(secret),
        "key": base64.b64encode(secret).decode(),
    }


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda d: "not json {", "not a JSON key file"),
        (lambda d: "[1, 2]", "not a JSON object"),
        (lambda d: {**d, "format": 9}, "unsupported format 9 (expected 1)"),
        (lambda d: {**d, "algorithm": "ROT13"}, "unsupported algorithm 'ROT13' (expected AES-256-GCM)"),
        (lambda d: {**d, "key": "@@@not base64@@@"}, '"key" is not base64'),
        (lambda d: {**d, "key": base64.b64encode(b"short").decode()}, '"key" must be 32 bytes'),
        (lambda d: {**d, "key_id": "0000000000000000"}, '"key_id" does not match "key" (edited or damaged)'),
    ],
)
def test_load_malformed(tmp_path, mutate, what: str) -> None:
    doc = good_doc()
    content = mutate(doc)
    path = write_key_file(tmp_path, content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(EncryptionKeyError) as err:
        keys.load_master_key(path)
    assert str(err.value) == f"key file {path} is malformed: {what}"
    assert doc["key"] not in str(err.value)  # never echo key material


def test_good_doc_loads(tmp_path) -> None:
    doc = good_doc()
    assert keys.load_master_key(write_key_file(tmp_path, json.dumps(doc))).key_id == doc["key_id"]


# -- vault keys -----------------------------------------------------------------


def test_empty_vault_has_empty_keyring(storage, tmp_path) -> None:
    keyring = keys.load_keyring(storage, master(tmp_path))
    assert len(keyring) == 0
    with pytest.raises(EncryptionKeyError, match="the vault has no encryption key yet"):
        keyring.current


def test_create_and_load_vault_keys(storage, tmp_path) -> None:
    m = master(tmp_path)
    first = keys.create_vault_key(storage, m)
    second = keys.create_vault_key(storage, m)
    assert [i.key for i in storage.list("keys/")] == sorted(
        [f"keys/{first.key_id}/{m.key_id}.json", f"keys/{second.key_id}/{m.key_id}.json"]
    )
    keyring = keys.load_keyring(storage, keys.load_master_key(m.path))
    assert dict(keyring) == {first.key_id: first, second.key_id: second}
    assert keyring.current == second  # the newest writes
    assert keyring.unavailable == frozenset()
    # records hold no key in the clear
    for info in storage.list("keys/"):
        with storage.open(info.key) as f:
            blob = f.read()
        assert first.secret not in blob and second.secret not in blob and m.secret not in blob


def test_record_is_a_codec_object_bound_to_its_name(storage, tmp_path) -> None:
    m = master(tmp_path)
    vk = keys.create_vault_key(storage, m)
    name = keys.record_name(vk.key_id, m.key_id)
    with storage.open(name) as f:
        assert codec.read_header(f).name == name
    # the same record under another vault key's name is refused
    other = keys.record_name("00000000000000aa", m.key_id)
    with storage.open(name) as f:
        storage.put(other, f)
    with pytest.raises(CorruptObjectError, match=f"object {other} is corrupt: its header names it"):
        keys.load_keyring(storage, m)


def test_wrong_master_refused(storage, tmp_path) -> None:
    right = master(tmp_path, "right.key")
    keys.create_vault_key(storage, right)
    wrong = master(tmp_path, "wrong.key")
    with pytest.raises(EncryptionKeyError) as err:
        keys.load_keyring(storage, wrong)
    assert str(err.value) == (
        f"the key file {wrong.path} (id {wrong.key_id}) is not a key of this vault; "
        f"the vault's keys are wrapped by: {right.key_id}"
    )
    assert right.secret.hex() not in str(err.value)


def test_vault_key_usable_by_codec(storage, tmp_path) -> None:
    m = master(tmp_path)
    vk = keys.create_vault_key(storage, m)
    blob, sha = codec.encode_bytes(b"payload", name="x/y", key=vk)
    keyring = keys.load_keyring(storage, m)
    assert codec.decode_bytes(blob, name="x/y", keyring=keyring, expected_sha256=sha) == b"payload"


def test_vault_key_validates_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VaultKey(key_id="ab", secret=b"short")
    assert "secret" not in repr(VaultKey(key_id="ab", secret=bytes(32)))


def test_keyring_reports_keys_it_cannot_unwrap(storage, tmp_path) -> None:
    a, b = master(tmp_path, "a.key"), master(tmp_path, "b.key")
    shared = keys.create_vault_key(storage, a)
    only_b = keys.create_vault_key(storage, b)
    keyring = keys.load_keyring(storage, a)
    assert list(keyring) == [shared.key_id]
    assert keyring.unavailable == {only_b.key_id}


def test_tampered_record_refused(storage, tmp_path) -> None:
    m = master(tmp_path)
    vk = keys.create_vault_key(storage, m)
    name = keys.record_name(vk.key_id, m.key_id)
    with storage.open(name) as f:
        doc = json.loads(codec.decode_bytes(f.read(), name=name))
    doc["created"] = "2099-01-01T00:00:00.000000+00:00"  # try to make it "newest"
    blob, _ = codec.encode_bytes(json.dumps(doc).encode(), name=name, compression="none")
    storage.delete(name)
    storage.put(name, io.BytesIO(blob))
    with pytest.raises(CorruptObjectError, match=f"vault key record {name} does not unwrap with master key {m.key_id}"):
        keys.load_keyring(storage, m)


# -- rotation -------------------------------------------------------------------


def test_rotation(storage, tmp_path) -> None:
    old = master(tmp_path, "old.key")
    vk1 = keys.create_vault_key(storage, old)
    vk2 = keys.create_vault_key(storage, old)
    objects = {}
    for i, vk in enumerate((vk1, vk2)):
        name = f"wal/00000001000000000000000{i}"
        data = os.urandom(1000) * 50
        reader = codec.encode(io.BytesIO(data), name=name, key=vk)
        storage.put(name, reader)
        objects[name] = (data, reader.plaintext_sha256)
    before = {name: storage.open(name).read() for name in objects}

    new = master(tmp_path, "new.key")
    assert keys.rotate_master_key(storage, old, new) == 2

    # only copies wrapped by the new master remain; objects are untouched
    assert sorted(i.key for i in storage.list("keys/")) == sorted(
        keys.record_name(vk.key_id, new.key_id) for vk in (vk1, vk2)
    )
    assert {name: storage.open(name).read() for name in objects} == before
    keyring = keys.load_keyring(storage, keys.load_master_key(new.path))
    assert keyring.current == vk2  # creation times survive rotation
    for name, (data, sha) in objects.items():
        with storage.open(name) as f:
            assert codec.decode(f, name=name, keyring=keyring, expected_sha256=sha).read() == data
    with pytest.raises(EncryptionKeyError) as err:
        keys.load_keyring(storage, old)
    assert str(err.value).endswith(f"(id {old.key_id}) is not a key of this vault; the vault's keys are wrapped by: {new.key_id}")


def test_rotation_resumes_after_crash(storage, tmp_path) -> None:
    """A copy already written under the new master (crash before the deletes) is checked, not rewritten."""
    old, new = master(tmp_path, "old.key"), master(tmp_path, "new.key")
    vk = keys.create_vault_key(storage, old)
    keys._write_record(storage, vk, new, keys.KEYS_PREFIX)  # what a crashed rotation left
    assert set(keys.load_keyring(storage, old)) == set(keys.load_keyring(storage, new)) == {vk.key_id}
    assert keys.rotate_master_key(storage, old, new) == 1
    assert [i.key for i in storage.list("keys/")] == [keys.record_name(vk.key_id, new.key_id)]


def test_rotation_refuses_same_key_and_foreign_key(storage, tmp_path) -> None:
    old = master(tmp_path, "old.key")
    keys.create_vault_key(storage, old)
    with pytest.raises(EncryptionKeyError, match="holds the same key"):
        keys.rotate_master_key(storage, old, keys.load_master_key(old.path))
    stranger, new = master(tmp_path, "stranger.key"), master(tmp_path, "new.key")
    with pytest.raises(EncryptionKeyError, match="is not a key of this vault"):
        keys.rotate_master_key(storage, stranger, new)
    assert len(keys.load_keyring(storage, old)) == 1  # nothing changed


def test_rotation_back_and_forth(storage, tmp_path) -> None:
    a, b = master(tmp_path, "a.key"), master(tmp_path, "b.key")
    vk = keys.create_vault_key(storage, a)
    assert keys.rotate_master_key(storage, a, b) == 1
    assert keys.rotate_master_key(storage, b, a) == 1
    assert keys.load_keyring(storage, a).current == vk


def test_keyring_mapping() -> None:
    k1 = VaultKey(key_id="a" * 16, secret=bytes(32), created="2024-01-01T00:00:00+00:00")
    k2 = VaultKey(key_id="b" * 16, secret=bytes(32), created="2023-01-01T00:00:00+00:00")
    ring = Keyring([k1, k2])
    assert ring.get("a" * 16) is k1 and ring.get("c" * 16) is None and "b" * 16 in ring
    assert ring.current is k1
