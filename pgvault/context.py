"""Build the objects a command needs from Settings: the one place settings meet the library.

The CLI calls these and hands explicit values down; nothing below reads config.
"""

from __future__ import annotations

from pgvault.config import Settings
from pgvault.errors import EncryptionKeyError
from pgvault.storage import Storage, open_storage


def storage_for(settings: Settings, *, create: bool = True) -> Storage:
    v = settings.vault
    return open_storage(
        v.url,
        cluster=v.cluster,
        endpoint_url=v.endpoint_url,
        region=v.region,
        access_key_id=v.access_key_id,
        secret_access_key=v.secret_access_key,
        sse=v.sse,
        create=create,
    )


def master_key_for(settings: Settings):
    """The master key from [encryption] key_file, or None when encryption is off."""
    if not settings.encryption.key_file:
        return None
    from pgvault.keys import load_master_key

    return load_master_key(settings.encryption.key_file)


def keyring_for(settings: Settings, storage: Storage):
    """The vault keys unwrapped by this node's master key, or None when encryption is off."""
    master = master_key_for(settings)
    if master is None:
        return None
    from pgvault.keys import load_keyring

    return load_keyring(storage, master)


def encryption_mismatch(settings: Settings, record, *, where: str) -> EncryptionKeyError | None:
    """The error to raise when [encryption] key_file disagrees with the vault record, else None.

    The record (written once by `pgvault init`) is what says whether a vault is
    encrypted; a node configured otherwise would write objects the others refuse
    to read (plaintext in an encrypted vault: archived WAL that cannot be
    restored), or encrypt into a vault whose record says it never is.
    """
    key_file = settings.encryption.key_file
    if record.encryption_key_id is not None and not key_file:
        return EncryptionKeyError(
            f"the vault {where} is encrypted (vault key {record.encryption_key_id}), "
            "but no encryption key is configured ([encryption] key_file is not set)",
            hint="set [encryption] key_file (or PGVAULT_ENCRYPTION_KEY_FILE) to this vault's master key file, "
            "as on the node that ran `pgvault init` (after `pgvault key rotate`: the new one)",
        )
    if record.encryption_key_id is None and key_file:
        return EncryptionKeyError(
            f"the vault {where} is not encrypted (its record was created without a key), "
            f"but [encryption] key_file is set ({key_file})",
            hint="remove [encryption] key_file (and PGVAULT_ENCRYPTION_KEY_FILE): a vault is encrypted or not "
            "from `pgvault init` on; for an encrypted vault, init a new one (another [vault] url or cluster)",
        )
    return None


def vault_keyring(settings: Settings, storage: Storage, record):
    """The keyring for reading and writing this vault's objects, or None for an unencrypted vault.

    Refuses (EncryptionKeyError) a config that disagrees with the vault record,
    and a key file that does not unlock the record's vault key: every command
    that encodes objects gets its key from here, so none can write plaintext
    into an encrypted vault, nor encrypt into an unencrypted one.
    """
    mismatch = encryption_mismatch(settings, record, where=storage.description)
    if mismatch is not None:
        raise mismatch
    if record.encryption_key_id is None:
        return None  # without importing keys (cryptography, dataclasses): wal-push starts per segment
    keyring = keyring_for(settings, storage)
    if record.encryption_key_id not in keyring:
        raise EncryptionKeyError(
            f"the key file {settings.encryption.key_file} does not unlock vault key {record.encryption_key_id} "
            f"of {storage.description}",
            hint="use the master key file the vault's keys are wrapped with (after a rotation, the new one)",
        )
    return keyring
