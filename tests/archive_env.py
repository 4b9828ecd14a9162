"""A live cluster whose archive_command and restore_command go through pgvault, for either backend."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from tests.clihelp import Result, run_pgvault, write_config
from tests.fixtures.pgcluster import PgCluster, chown_tree, pgvault_executable


@dataclass
class ArchiveEnv:
    cluster: PgCluster
    config: str
    base: str  # a postgres-owned directory whose name has a space in it
    backend: str
    storage: object  # a Storage on the same vault, for looking behind pgvault's back
    s3: object = None  # (endpoint, bucket) for the S3 backend

    def pgvault(self, *args: str, **kw) -> Result:
        return run_pgvault(*args, config=self.config, as_postgres=True, **kw)

    def switch(self) -> str:
        """Write something and switch WAL; returns the name of the segment just completed."""
        self.cluster.sql("CREATE TABLE IF NOT EXISTS t(x int)")
        self.cluster.sql("INSERT INTO t VALUES (1)")
        return self.cluster.one("SELECT pg_walfile_name(pg_switch_wal())")

    def wait_archived(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.cluster.one("SELECT last_archived_wal FROM pg_stat_archiver")
            if last is not None and last >= name:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} not archived after {timeout}s; pg_stat_archiver: "
                             f"{self.cluster.sql('SELECT * FROM pg_stat_archiver')}\n{self.cluster.log()[-3000:]}")

    def listing(self) -> dict:
        res = self.pgvault("list", "--json")
        assert res.code == 0, res.err
        return json.loads(res.out)

    def archived_names(self) -> set[str]:
        from pgvault.catalog import list_archived_wal

        return {e.name for e in list_archived_wal(self.storage)}


def archive_command(config: str) -> str:
    return f'"{pgvault_executable()}" --config "{config}" wal-push "%p"'


def restore_command(config: str) -> str:
    return f'"{pgvault_executable()}" --config "{config}" wal-fetch "%f" "%p"'


def make_archive_env(cluster: PgCluster, pg_tmp: str, *, backend: str, s3=None, extra: str = "",
                     endpoint_url: str | None = None, init: bool = True) -> ArchiveEnv:
    base = os.path.join(pg_tmp, "dir with space")
    os.makedirs(base, exist_ok=True)
    if backend == "local":
        vault = f'url = "file://{base}/vault"'
    else:
        endpoint, bucket = s3
        vault = (f'url = "s3://{bucket}/pfx"\nendpoint_url = "{endpoint_url or endpoint.url}"\n'
                 f'region = "{endpoint.region}"\naccess_key_id = "{endpoint.access_key}"\n'
                 f'secret_access_key = "{endpoint.secret_key}"')
    config = write_config(os.path.join(base, "pgvault.toml"), f"""
[vault]
{vault}
[postgres]
conninfo = "{cluster.conninfo}"
data_dir = "{cluster.data_dir}"
[archive]
spool_dir = "{base}/spool"
{extra}
""")
    chown_tree(pg_tmp)
    from pgvault.config import load_settings
    from pgvault.context import storage_for

    storage = storage_for(load_settings(config, environ={}), create=False) if backend == "s3" else None
    env = ArchiveEnv(cluster=cluster, config=config, base=base, backend=backend, storage=storage, s3=s3)
    if init:
        res = env.pgvault("init")
        assert res.code == 0, res.err
    if env.storage is None:
        from pgvault.storage.local import LocalStorage

        env.storage = LocalStorage(os.path.join(base, "vault", "main"), create=False)
    cluster.set(archive_command=archive_command(config))
    cluster.reload()
    return env


def new_master_key(path: str) -> str:
    """A master key file made by `pgvault key generate` as postgres (its directory must exist); returns ``path``."""
    res = run_pgvault("key", "generate", path, as_postgres=True)
    assert res.code == 0, res.err
    return path


def make_encrypted_archive_env(cluster: PgCluster, pg_tmp: str) -> tuple[ArchiveEnv, str]:
    """A local-vault ArchiveEnv encrypted with a new master key; (env, the key file)."""
    base = os.path.join(pg_tmp, "dir with space")
    os.makedirs(base, exist_ok=True)
    chown_tree(pg_tmp)
    key_file = new_master_key(os.path.join(base, "master.key"))
    env = make_archive_env(cluster, pg_tmp, backend="local", extra=f'[encryption]\nkey_file = "{key_file}"')
    return env, key_file
