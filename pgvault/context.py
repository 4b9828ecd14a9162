"""Build the objects a command needs from Settings: the one place settings meet the library.

The CLI calls these and hands explicit values down; nothing below reads config.
"""

from __future__ import annotations

from pgvault.config import Settings
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
