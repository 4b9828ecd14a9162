"""The vault record says whether a vault is encrypted; a node configured otherwise must not write.

Plaintext WAL in an encrypted vault is WAL that restore refuses (a plaintext
object there can only be a substitute), so it is as good as lost; and an
encrypted object in a vault whose record says "unencrypted" is read by no node
configured after the record. Every writer gets its key through
walcmd.archive_context → context.vault_keyring, which refuses both.
"""

from __future__ import annotations

import os

import pytest

from pgvault import codec, keys, walcmd
from pgvault.config import load_settings
from pgvault.errors import EncryptionKeyError
from pgvault.storage.local import LocalStorage
from pgvault.vault import init_vault

SYSID = 7351234567890123456
HISTORY = "00000002.history"  # pushed without a WAL page header check: only the key decides


class Vault:
    def __init__(self, tmp_path, *, encrypted: bool) -> None:
        self.tmp_path = tmp_path
        self.storage = LocalStorage(str(tmp_path / "vault" / "main"))
        self.key_file = None
        key_id = None
        if encrypted:
            master = keys.generate_master_key_file(str(tmp_path / "master.key"))
            key_id = keys.create_vault_key(self.storage, master).key_id
            self.key_file = master.path
        self.record = init_vault(self.storage, cluster="main", system_identifier=SYSID, pg_major_version=15,
                                 wal_segment_size=16 << 20, encryption_key_id=key_id).record

    def config(self, key_file: str | None, name: str = "pgvault.toml") -> str:
        path = self.tmp_path / name
        text = f'[vault]\nurl = "file://{self.tmp_path}/vault"\n'
        if key_file:
            text += f'[encryption]\nkey_file = "{key_file}"\n'
        path.write_text(text)
        return str(path)

    def push_history_file(self, config: str) -> int:
        path = self.tmp_path / HISTORY
        path.write_text("1\t0/3000000\tno recovery target specified\n")
        return walcmd.run_wal_push(config, str(path), settings=load_settings(config, environ={}))

    def wal_objects(self) -> list[str]:
        return [info.key for info in self.storage.list("wal/")]


def another_master_key(tmp_path, name: str = "other.key") -> keys.MasterKey:
    return keys.generate_master_key_file(str(tmp_path / name))


def test_wal_push_into_an_encrypted_vault_without_a_key_fails_and_stores_nothing(tmp_path, capsys):
    vault = Vault(tmp_path, encrypted=True)
    code = vault.push_history_file(vault.config(key_file=None))
    assert code == 11  # non-zero: PostgreSQL keeps the WAL and retries
    assert vault.wal_objects() == []
    assert capsys.readouterr().err.splitlines() == [
        f"pgvault: error: the vault {vault.storage.description} is encrypted "
        f"(vault key {vault.record.encryption_key_id}), but no encryption key is configured "
        "([encryption] key_file is not set)",
        "HINT: set [encryption] key_file (or PGVAULT_ENCRYPTION_KEY_FILE) to this vault's master key file, "
        "as on the node that ran `pgvault init` (after `pgvault key rotate`: the new one)",
    ]


def test_wal_push_into_an_unencrypted_vault_with_a_key_fails_and_stores_nothing(tmp_path, capsys):
    vault = Vault(tmp_path, encrypted=False)
    master = another_master_key(tmp_path)
    keys.create_vault_key(vault.storage, master)  # what `pgvault init` used to leave there when re-run with a key
    code = vault.push_history_file(vault.config(key_file=master.path))
    assert code == 11
    assert vault.wal_objects() == []
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"pgvault: error: the vault {vault.storage.description} is not encrypted (its record was "
                      f"created without a key), but [encryption] key_file is set ({master.path})")
    assert err[1].startswith("HINT: remove [encryption] key_file (and PGVAULT_ENCRYPTION_KEY_FILE)")


@pytest.mark.parametrize("encrypted", [True, False])
def test_a_config_that_agrees_with_the_record_pushes(tmp_path, encrypted):
    vault = Vault(tmp_path, encrypted=encrypted)
    assert vault.push_history_file(vault.config(key_file=vault.key_file)) == 0
    (key,) = vault.wal_objects()
    with vault.storage.open(key) as f:
        assert codec.read_header(f).encrypted is encrypted


@pytest.mark.parametrize("encrypted", [True, False])
def test_every_command_that_reads_or_writes_objects_refuses_a_disagreeing_config(tmp_path, encrypted):
    # backup, dump, wal-push, push-ahead, reseed's orphans, restore, verify… all take their
    # keyring and codec options from archive_context.
    vault = Vault(tmp_path, encrypted=encrypted)
    key_file = None if encrypted else another_master_key(tmp_path).path
    settings = load_settings(vault.config(key_file=key_file), environ={})
    with pytest.raises(EncryptionKeyError) as err:
        walcmd.archive_context(settings)
    assert ("is encrypted" if encrypted else "is not encrypted") in err.value.message
    assert err.value.exit_code == 11


def test_a_key_file_that_does_not_unlock_the_records_vault_key_is_refused(tmp_path):
    vault = Vault(tmp_path, encrypted=True)
    other = another_master_key(tmp_path)
    keys.create_vault_key(vault.storage, other)  # a vault key, but not the one the record names
    settings = load_settings(vault.config(key_file=other.path), environ={})
    with pytest.raises(EncryptionKeyError) as err:
        walcmd.archive_context(settings)
    assert err.value.message == (f"the key file {other.path} does not unlock vault key "
                                 f"{vault.record.encryption_key_id} of {vault.storage.description}")


def test_the_unencrypted_wal_path_does_not_load_key_machinery(tmp_path):
    # The agreement check runs before any key is loaded: an unencrypted vault never imports keys.
    import subprocess
    import sys

    vault = Vault(tmp_path, encrypted=False)
    probe = ("import sys; from pgvault import walcmd; from pgvault.config import load_settings; "
             "walcmd.archive_context(load_settings(sys.argv[1], environ={})); print('pgvault.keys' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, vault.config(key_file=None)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    assert out == "False"
