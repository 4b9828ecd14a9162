"""End to end with Patroni and etcd: a failover loses no acknowledged row.

etcd and two Patroni nodes on loopback, both archiving through pgvault. node1
bootstraps and leads; after a backup, node2 is created by Patroni through
pgvault (create_replica_methods: deploy/patroni/pgvault-replica → reseed). A
writer commits rows one by one to whichever node leads, and remembers every
commit that was acknowledged. Replication to node2 goes through a proxy (node1's
connect_address), which is cut: node1 keeps acknowledging rows node2 never
receives. node1 is killed (SIGKILL); Patroni promotes node2, the writer moves
there. node1 comes back through `pgvault reseed --delta --no-start` and its
Patroni, as a replica of node2. Every acknowledged row is then on node2 — or,
for node1's unreplicated ones, in the orphaned tail, which a scratch node
replays to show it (and that node1 holds node2's rows only).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import psycopg
import pytest

from tests.clihelp import run_pgvault, write_config
from tests.fixtures.patroni import Etcd, PatroniNode, missing_tools
from tests.fixtures.pgcluster import chown_tree, free_port, make_pg_owned_dir
from tests.fixtures.tcpproxy import TcpProxy
from tests.test_reseed import replay_orphan

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Writer(threading.Thread):
    """Commits rows 1, 2, 3, … one per transaction to whichever node is the primary; records the acknowledged ones."""

    def __init__(self, nodes: list[PatroniNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.acked: dict[str, set[int]] = {n.name: set() for n in nodes}
        self.next_id = 1
        self.halt = threading.Event()

    def _primary(self):
        for node in self.nodes:
            try:
                conn = psycopg.connect(node.conninfo, autocommit=True, connect_timeout=2)
            except psycopg.Error:
                continue
            try:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False:
                    return node, conn
            except psycopg.Error:
                pass
            conn.close()
        return None, None

    def run(self) -> None:
        node = conn = None
        while not self.halt.is_set():
            if conn is None:
                node, conn = self._primary()
                if conn is None:
                    time.sleep(0.2)
                    continue
            try:
                conn.execute("INSERT INTO o (id, node) VALUES (%s, %s)", (self.next_id, node.name))
                self.acked[node.name].add(self.next_id)  # the commit returned: acknowledged
            except psycopg.Error:
                conn.close()
                node = conn = None
            self.next_id += 1  # an id whose commit was not acknowledged is never reused
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def wait_until(predicate, what: str, timeout: float, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in logs)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail}")
        time.sleep(0.3)


def rows(node: PatroniNode) -> set[int]:
    with psycopg.connect(node.conninfo, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM o").fetchall()}


def streams_from(node: PatroniNode, port: int) -> bool:
    try:
        with psycopg.connect(node.conninfo, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute("SELECT status, sender_port FROM pg_stat_wal_receiver").fetchone()
    except psycopg.Error:
        return False
    return row is not None and row[0] == "streaming" and row[1] == port


@pytest.fixture
def patroni_pair():
    why = missing_tools()
    if why:
        pytest.skip(why)
    base = make_pg_owned_dir("pgvault-patroni-")
    etcd = Etcd(base)
    nodes = []
    proxy = None
    try:
        n1 = PatroniNode("node1", os.path.join(base, "node1"), free_port(), free_port())
        n2 = PatroniNode("node2", os.path.join(base, "node2"), free_port(), free_port())
        proxy = TcpProxy("127.0.0.1", n1.pg_port)
        n1.connect_port = proxy.port
        for n in (n1, n2):
            os.makedirs(n.base)
        config = write_config(os.path.join(base, "pgvault.toml"), f"""
[vault]
url = "file://{base}/vault"
[postgres]
conninfo = "{n1.conninfo}"
data_dir = "{n1.data_dir}"
[archive]
spool_dir = "{base}/spool"
[backup]
wal_timeout = 60
""")
        chown_tree(base)
        for n in (n1, n2):
            n.write_config(scope="pgvault-test", etcd=etcd, pgvault_config=config)
            nodes.append(n)
        yield n1, n2, proxy, config
    finally:
        for n in nodes:
            n.stop()
        if proxy is not None:
            proxy.close()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_patroni_failover_loses_no_acknowledged_row(patroni_pair):
    n1, n2, proxy, config = patroni_pair
    began = time.monotonic()
    n1.start()
    wait_until(lambda: n1.role() == "primary", "node1 to bootstrap and lead", 90, [n1])
    res = run_pgvault("init", config=config, as_postgres=True)
    assert res.code == 0, res.err
    with psycopg.connect(n1.conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE o (id int PRIMARY KEY, node text NOT NULL)")
    res = run_pgvault("backup", "--json", config=config, as_postgres=True, timeout=180)
    assert res.code == 0, res.err

    n2.start()  # an empty data directory: Patroni creates the replica through pgvault
    wait_until(lambda: n2.role() == "replica" and streams_from(n2, proxy.port),
               "node2 to be created through pgvault and stream", 120, [n2])
    assert "replica has been created using pgvault" in n2.log(), n2.log()[-3000:]

    writer = Writer([n1, n2])
    writer.start()
    time.sleep(3)
    proxy.cut()  # node2 hears nothing more from node1, which goes on acknowledging commits
    time.sleep(2)
    n1.kill()
    killed_at = time.monotonic()
    wait_until(lambda: n2.role() == "primary", "Patroni to promote node2", 90, [n2])
    failover_seconds = time.monotonic() - killed_at
    wait_until(lambda: len(writer.acked["node2"]) >= 100, "the writer to commit on node2", 60)
    assert writer.acked["node1"], "node1 acknowledged nothing"

    # node1 comes back through pgvault (as the postgres user, as Patroni would run it), then its Patroni
    res = run_pgvault("reseed", "--data-dir", n1.data_dir, "--primary-conninfo", n2.conninfo, "--delta",
                      "--no-start", "--json", config=config, as_postgres=True, timeout=600)
    assert res.code == 0, res.err
    reseeded = json.loads(res.out)
    n1.start()
    wait_until(lambda: n1.role() == "replica" and streams_from(n1, n2.pg_port), "node1 to rejoin as node2's replica", 120,
               [n1])
    time.sleep(1)
    writer.stop()
    wait_until(lambda: rows(n1) == rows(n2), "node1 to catch up with node2", 60, [n1])

    on_new_primary = rows(n2)
    assert writer.acked["node2"] <= on_new_primary
    unreplicated = writer.acked["node1"] - on_new_primary
    assert unreplicated, "the proxy cut left no unreplicated commit on node1: the test proves nothing"
    orphan = reseeded["orphan"]
    assert orphan is not None and reseeded["divergence"]["diverged"] is True
    # the orphan holds them: replayed on top of the old timeline, every row node1 acknowledged is back
    replayed = replay_orphan(_Env(config), orphan["id"], timeline=orphan["fork_timeline"])
    missing = writer.acked["node1"] - replayed
    assert not missing, f"acknowledged by node1, on neither node2 nor in the orphan: {sorted(missing)[:10]}"
    # one transaction per row, nothing else writes: the tail's commits are node1's rows node2 lacks (acknowledged
    # or not: the commit the kill interrupted may be there without its acknowledgement)
    assert orphan["commits"] == len(replayed - on_new_primary) >= len(unreplicated), (orphan, sorted(unreplicated))
    assert unreplicated.isdisjoint(rows(n1))  # the rejoined node never replays its own diverged tail
    print(f"patroni story: {time.monotonic() - began:.0f} s, failover {failover_seconds:.0f} s, "
          f"{sum(map(len, writer.acked.values()))} rows acknowledged, {len(unreplicated)} kept in orphans")


class _Env:
    def __init__(self, config: str) -> None:
        self.config = config

