"""Encryption keys in three levels, so the master key can rotate without re-encrypting data.

    master key   a file the user holds ([encryption] key_file), never stored in the vault
      wraps
    vault keys   random keys stored IN the vault as ``keys/<vault key id>/<master key id>.json``,
                 each record holding one vault key wrapped (AES-256-GCM) by one master key
      wrap
    data keys    one random key per object, wrapped in the object's header (see ``codec``)

Rotating the master key writes a second wrapped copy of every vault key, checks
it reads back, and only then deletes the copies wrapped by the old master key:
objects are never touched, and a crash at any point leaves every vault key
readable with the old or the new master key. Messages never include key material.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pgvault import codec
from pgvault.errors import CorruptObjectError, EncryptionKeyError
from pgvault.storage.base import Storage

KEY_FILE_FORMAT = 1
RECORD_FORMAT = 1
ALGORITHM = "AES-256-GCM"
KEY_SIZE = 32
#: Where vault key records live, relative to the storage given.
KEYS_PREFIX = "keys"
_MAX_KEY_FILE = 64 << 10
_RECORD_NAME = re.compile(r"^(?P<vault>[0-9a-f]{16})/(?P<master>[0-9a-f]{16})\.json$")


@dataclass(frozen=True)
class MasterKey:
    """The user's key, loaded from ``path``. Its id is derived from the secret (see ``master_key_id``)."""

    key_id: str
    secret: bytes = field(repr=False)
    path: str = ""


@dataclass(frozen=True)
class VaultKey:
    """A key stored in the vault (wrapped); it wraps the data key of every object written with it."""

    key_id: str
    secret: bytes = field(repr=False)
    #: ISO 8601 UTC; the newest key is the one new objects are written with.
    created: str = ""

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise ValueError(f"vault key {self.key_id}: a key is {KEY_SIZE} bytes")


class Keyring(Mapping[str, VaultKey]):
    """The vault keys one master key unwraps, by key id: what ``codec.decode`` needs."""

    def __init__(self, keys: Iterable[VaultKey] = (), *, unavailable: Iterable[str] = ()) -> None:
        self._keys = {k.key_id: k for k in keys}
        #: Vault key ids present in the vault but not wrapped by this master key:
        #: objects written with them cannot be read (should be empty; `check` reports it).
        self.unavailable = frozenset(unavailable) - set(self._keys)

    def __getitem__(self, key_id: str) -> VaultKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def current(self) -> VaultKey:
        """The newest vault key: new objects are encrypted with it."""
        if not self._keys:
            raise EncryptionKeyError("the vault has no encryption key yet", hint="run `pgvault init` to create one")
        return max(self._keys.values(), key=lambda k: (k.created, k.key_id))

    def __repr__(self) -> str:
        return f"Keyring({sorted(self._keys)})"


def master_key_id(secret: bytes) -> str:
    """A master key's id: a hash of the key, so a key file whose id and key disagree is detected."""
    return hashlib.sha256(b"pgvault master key id\0" + secret).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def generate_master_key_file(path: str) -> MasterKey:
    """Create a new master key file at ``path`` (mode 0600); refuses to overwrite anything."""
    secret = os.urandom(KEY_SIZE)
    key = MasterKey(key_id=master_key_id(secret), secret=secret, path=path)
    content = json.dumps(
        {
            "format": KEY_FILE_FORMAT,
            "algorithm": ALGORITHM,
            "key_id": key.key_id,
            "key": base64.b64encode(secret).decode("ascii"),
            "created": _now(),
            "comment": "pgvault master key: keep a copy outside the vault; without it the vault cannot be read",
        },
        indent=2,
    ) + "\n"
    try:
        # O_EXCL: never replace a key file, whose loss would make a vault unreadable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EncryptionKeyError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise EncryptionKeyError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, content.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_master_key(path: str) -> MasterKey:
    """Load and check a master key file; EncryptionKeyError naming ``path`` if anything is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise EncryptionKeyError(f"key file {path} does not exist", hint="check [encryption] key_file") from None
    except OSError as exc:
        hint = "the user running pgvault (for archive_command: postgres) must own the key file" if exc.errno in (
            errno.EACCES, errno.EPERM) else None
        raise EncryptionKeyError(f"cannot read key file {path}: {exc.strerror}", hint=hint) from None
    try:
        st = os.fstat(fd)  # of the file opened, not of whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise EncryptionKeyError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise EncryptionKeyError(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 600 {path}`"
            )
        raw = os.read(fd, _MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_KEY_FILE:
        raise EncryptionKeyError(f"key file {path} is malformed: larger than {_MAX_KEY_FILE} bytes")
    return _parse_key_file(path, raw)


def _parse_key_file(path: str, raw: bytes) -> MasterKey:
    def malformed(what: str) -> EncryptionKeyError:
        # Never echo the content: it is key material.
        return EncryptionKeyError(f"key file {path} is malformed: {what}", hint="restore it from your copy of the key file")

    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise malformed("not a JSON key file") from None
    if not isinstance(doc, dict):
        raise malformed("not a JSON object")
    if doc.get("format") != KEY_FILE_FORMAT:
        raise malformed(f"unsupported format {doc.get('format')!r} (expected {KEY_FILE_FORMAT})")
    if doc.get("algorithm") != ALGORITHM:
        raise malformed(f"unsupported algorithm {doc.get('algorithm')!r} (expected {ALGORITHM})")
    try:
        secret = base64.b64decode(str(doc.get("key", "")), validate=True)
    except (binascii.Error, ValueError):
        raise malformed('"key" is not base64') from None
    if len(secret) != KEY_SIZE:
        raise malformed(f'"key" must be {KEY_SIZE} bytes')
    key_id = master_key_id(secret)
    if doc.get("key_id") != key_id:
        raise malformed('"key_id" does not match "key" (edited or damaged)')
    return MasterKey(key_id=key_id, secret=secret, path=path)


# -- vault key records ------------------------------------------------------


def record_name(vault_id: str, master_id: str, *, prefix: str = KEYS_PREFIX) -> str:
    """Object name of the record of vault key ``vault_id`` wrapped by master key ``master_id``."""
    return f"{prefix}/{vault_id}/{master_id}.json"


def parse_record_name(name: str, *, prefix: str = KEYS_PREFIX) -> tuple[str, str] | None:
    """(vault key id, master key id) of a record name, or None if ``name`` is not one."""
    if not name.startswith(prefix + "/"):
        return None
    match = _RECORD_NAME.match(name[len(prefix) + 1 :])
    return (match["vault"], match["master"]) if match else None


def _aad(vault_id: str, master_id: str, created: str) -> bytes:
    # Binding the ids and the creation time: a record cannot be renamed, nor
    # made "newest" to steer which key new objects use.
    return f"pgvault vault key\0{RECORD_FORMAT}\0{vault_id}\0{master_id}\0{created}".encode()


def _write_record(storage: Storage, vault_key: VaultKey, master: MasterKey, prefix: str) -> None:
    nonce = os.urandom(12)
    wrapped = AESGCM(master.secret).encrypt(nonce, vault_key.secret, _aad(vault_key.key_id, master.key_id, vault_key.created))
    doc = {
        "format": RECORD_FORMAT,
        "algorithm": ALGORITHM,
        "vault_key_id": vault_key.key_id,
        "master_key_id": master.key_id,
        "created": vault_key.created,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
    }
    name = record_name(vault_key.key_id, master.key_id, prefix=prefix)
    # Like every object, the record goes through the codec (unencrypted: the
    # wrap authenticates it), so it carries its name and checksum.
    blob, _ = codec.encode_bytes(json.dumps(doc, indent=2).encode(), name=name, compression="none")
    storage.put(name, io.BytesIO(blob))


def _read_record(storage: Storage, name: str, master: MasterKey, prefix: str) -> VaultKey:
    with storage.open(name) as stream:
        data = codec.decode(stream, name=name, keyring=None).read()
    ids = parse_record_name(name, prefix=prefix)
    try:
        doc = json.loads(data)
        vault_key_id, created = doc["vault_key_id"], doc["created"]
        if (vault_key_id, doc["master_key_id"]) != ids or doc.get("format") != RECORD_FORMAT:
            raise ValueError("ids or format do not match the name")
        nonce, wrapped = base64.b64decode(doc["nonce"]), base64.b64decode(doc["wrapped_key"])
        secret = AESGCM(master.secret).decrypt(nonce, wrapped, _aad(vault_key_id, master.key_id, created))
        return VaultKey(key_id=vault_key_id, secret=secret, created=created)
    except InvalidTag:
        raise CorruptObjectError(f"vault key record {name} does not unwrap with master key {master.key_id} (altered)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptObjectError(f"vault key record {name} is malformed: {exc}") from None


def create_vault_key(storage: Storage, master: MasterKey, *, prefix: str = KEYS_PREFIX) -> VaultKey:
    """Create a new vault key, store it wrapped by ``master``; it becomes the keyring's current key."""
    vault_key = VaultKey(key_id=secrets.token_hex(8), secret=os.urandom(KEY_SIZE), created=_now())
    _write_record(storage, vault_key, master, prefix)
    return vault_key


def load_keyring(storage: Storage, master: MasterKey, *, prefix: str = KEYS_PREFIX) -> Keyring:
    """Every vault key wrapped by ``master``. Empty if the vault has no key yet.

    EncryptionKeyError if the vault has keys but none is wrapped by ``master``.
    """
    mine: list[str] = []
    other_masters: set[str] = set()
    vault_ids: set[str] = set()
    for info in storage.list(prefix + "/"):
        ids = parse_record_name(info.key, prefix=prefix)
        if ids is None:
            continue  # not a record of this format: leave it alone
        vault_ids.add(ids[0])
        if ids[1] == master.key_id:
            mine.append(info.key)
        else:
            other_masters.add(ids[1])
    if not mine and other_masters:
        raise EncryptionKeyError(
            f"the key file {master.path} (id {master.key_id}) is not a key of this vault; "
            f"the vault's keys are wrapped by: {', '.join(sorted(other_masters))}",
            hint='use the key file whose "key_id" is one of those (after a rotation, the new key file)',
        )
    return Keyring((_read_record(storage, name, master, prefix) for name in mine), unavailable=vault_ids)


def rotate_master_key(storage: Storage, old_master: MasterKey, new_master: MasterKey, *, prefix: str = KEYS_PREFIX) -> int:
    """Re-wrap every vault key of ``old_master`` with ``new_master``; returns how many.

    Copies under the new master are written and read back first; the old copies
    are deleted only after all of them check out. Re-running after a crash is
    safe: copies already written are checked, not rewritten. Objects are untouched.
    """
    if old_master.key_id == new_master.key_id:
        raise EncryptionKeyError(f"the new key file {new_master.path} holds the same key as {old_master.path}")
    keyring = load_keyring(storage, old_master, prefix=prefix)
    for vault_key in keyring.values():
        name = record_name(vault_key.key_id, new_master.key_id, prefix=prefix)
        if storage.stat(name) is None:
            _write_record(storage, vault_key, new_master, prefix)
        if _read_record(storage, name, new_master, prefix).secret != vault_key.secret:
            raise CorruptObjectError(f"vault key record {name} holds another key than {vault_key.key_id}; rotation stopped")
    for vault_key in keyring.values():
        storage.delete(record_name(vault_key.key_id, old_master.key_id, prefix=prefix))
    return len(keyring)
