"""The vault record (``vault.json``): which cluster a vault belongs to, and in what format.

Written once by ``pgvault init``; every later command reads it to refuse a vault
that belongs to another cluster. It is stored through the object format
(unencrypted: it holds no secret and must be readable before any key is
loaded) so it carries its own checksum like every other object.
"""

from __future__ import annotations

import io
import json
from typing import NamedTuple

from pgvault import codec
from pgvault.errors import ObjectExistsError, ObjectNotFoundError, VaultMismatchError, VaultNotInitializedError
from pgvault.storage import Storage

VAULT_RECORD_KEY = "vault.json"
FORMAT_VERSION = 1


class VaultRecord(NamedTuple):
    format_version: int
    cluster: str
    system_identifier: int
    pg_major_version: int
    wal_segment_size: int
    encryption_key_id: str | None  # the vault key new objects are encrypted with; None: unencrypted
    created_at: str
    created_by: str

    def to_json(self) -> bytes:
        # system_identifier as a string: it does not fit a JSON double exactly.
        data = self._asdict() | {"system_identifier": str(self.system_identifier)}
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, *, where: str) -> "VaultRecord":
        try:
            data = json.loads(blob)
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise VaultMismatchError(
                    f"{where} has format version {version}; this pgvault understands up to {FORMAT_VERSION}",
                    hint="upgrade pgvault",
                )
            return cls(
                format_version=version,
                cluster=str(data["cluster"]),
                system_identifier=int(data["system_identifier"]),
                pg_major_version=int(data["pg_major_version"]),
                wal_segment_size=int(data.get("wal_segment_size", 16 * 1024 * 1024)),
                encryption_key_id=data.get("encryption_key_id"),
                created_at=str(data["created_at"]),
                created_by=str(data.get("created_by", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise VaultMismatchError(f"{where} is not a pgvault vault record ({exc.__class__.__name__}: {exc})") from None


def read_vault_record(storage: Storage) -> VaultRecord | None:
    """The vault record, or None if this cluster's part of the vault has none yet."""
    try:
        with storage.open(VAULT_RECORD_KEY) as f:
            blob = f.read()
    except ObjectNotFoundError:
        return None
    plain = codec.decode_bytes(blob, name=VAULT_RECORD_KEY, keyring=None)
    return VaultRecord.from_json(plain, where=f"{storage.description}/{VAULT_RECORD_KEY}")


def require_vault_record(storage: Storage, *, system_identifier: int | None = None) -> VaultRecord:
    """The vault record; refuses a missing one, and one of another cluster when the id is known."""
    record = read_vault_record(storage)
    if record is None:
        raise VaultNotInitializedError(f"the vault {storage.description} has no record for this cluster")
    if system_identifier is not None:
        check_same_cluster(record, system_identifier, storage=storage)
    return record


def check_same_cluster(record: VaultRecord, system_identifier: int, *, storage: Storage) -> None:
    if record.system_identifier != system_identifier:
        raise VaultMismatchError(
            f"the vault {storage.description} belongs to the cluster with system identifier "
            f"{record.system_identifier}, but this server's is {system_identifier}",
            hint="point [vault] url or [vault] cluster at this cluster's own vault; "
            "never mix two clusters' WAL in one place",
        )


class InitResult(NamedTuple):
    record: VaultRecord
    created: bool  # False: the vault already belonged to this cluster; nothing changed


def init_vault(
    storage: Storage,
    *,
    cluster: str,
    system_identifier: int,
    pg_major_version: int,
    wal_segment_size: int,
    encryption_key_id: str | None,
) -> InitResult:
    """Create the vault record, or confirm an existing one is this cluster's (a no-op)."""
    existing = read_vault_record(storage)
    if existing is not None:
        check_same_cluster(existing, system_identifier, storage=storage)
        return InitResult(record=existing, created=False)
    import socket  # here, not at the top: wal-push imports this module for every segment
    from datetime import datetime, timezone

    record = VaultRecord(
        format_version=FORMAT_VERSION,
        cluster=cluster,
        system_identifier=system_identifier,
        pg_major_version=pg_major_version,
        wal_segment_size=wal_segment_size,
        encryption_key_id=encryption_key_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        created_by=socket.gethostname(),
    )
    blob, _sha = codec.encode_bytes(record.to_json(), name=VAULT_RECORD_KEY, compression="none", key=None)
    try:
        storage.put(VAULT_RECORD_KEY, io.BytesIO(blob))
    except ObjectExistsError:
        # Another init won the race: it must have been for this same cluster.
        winner = require_vault_record(storage, system_identifier=system_identifier)
        return InitResult(record=winner, created=False)
    return InitResult(record=record, created=True)
