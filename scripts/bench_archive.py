#!/usr/bin/env python3
"""Benchmark WAL archiving: `pgvault wal-push` next to `pgbackrest archive-push`, in one run.

Run as root with the venv's python (it needs psycopg and pgvault):

    sudo /opt/pgvault-dev/venv/bin/python scripts/bench_archive.py [--quick] [--json]

Everything runs on one throwaway cluster: initdb as the `postgres` OS user in a
postgres-owned temporary directory, a free loopback port, production defaults
(fsync = on, synchronous_commit = on, full_page_writes = on) except
max_wal_size = 4GB, and archive_mode = on. Every archive command runs as
postgres with a clean environment, through /bin/sh -c, exactly as PostgreSQL
runs archive_command. The vaults and pgBackRest repositories are local
directories under the same temporary directory. Phases:

  1. fast path: `pgvault wal-push` of a segment already pushed ahead (spool
     marker present; the first markers come from a real async push-ahead, the
     rest from Spool.mark_pushed after it, one before each call), median wall ms,
     next to `python -c pass` (the floor) and pgBackRest's own fast path (async,
     `.ok` already in its spool). Goal: <= 25 ms.
  2. sync push of one 16 MB segment (real, distinct segments of this cluster,
     copied out of pg_wal while archiving was held back): pgvault zstd-1 (its WAL default) with and
     without AES-256-GCM vs pgbackrest zst-3 with and without aes-256-cbc.
     Median ms per segment. Goal: pgvault / pgbackrest <= 1.0.
  3. backlog drain: archiving held back (archive_command failing) while ~40
     segments are written, then the real archive_command is set and the
     configuration reloaded; segments/s until pg_stat_archiver.last_archived_wal
     reaches the last one (server timestamps), best of --drain-rounds rounds
     (every other round in reverse order). Also: when the first segment was
     archived (pgvault's push-ahead batch), the rate after it (the fast-path
     chain), and CPU ms per segment, machine-wide and of the archive commands.
     Goal: >= 40 segments/s (async).
  4. sustained: a paced bulk INSERT load (>= 8 segments/s) and `pgbench -c 8`,
     sampling once a second the gap in segments between the current WAL segment
     and the last archived one (1 = everything completed is archived). Goal:
     max gap <= 3.

CPU ms of a timed call comes from wait4() (the command with its threads and
waited-for children). A monitor samples /proc once a second for the CPU that
other processes use (anything not started by this run): each phase prints it
as "noise". --wait-idle waits for the machine to go quiet before starting.

pgvault runs by default from a regular (non-editable) install built in the
temporary directory from this checkout, as scripts/setup-dev.sh installs it:
the package copied into a fresh venv and byte-compiled, its dependencies taken
from the dev venv's site-packages. The dev venv's editable install (no
bytecode cache for pgvault, an import hook in a .pth file) is measured beside
it in phase 1; `--pgvault dev` runs every phase with it.

Ctrl-C or SIGTERM stop everything the run started (only the server it created,
by its data directory) and remove the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psycopg
from benchlib import PG_USER, PW, REPO, BenchError, build_regular_install, chown_pg, dir_bytes, free_port, log, mkdir_pg
from psycopg import sql as pgsql

sys.path.insert(0, REPO)  # pgvault.spool for the markers, from this checkout

STANZA = "bench"
GOAL_FAST_MS = 25.0
GOAL_SYNC_RATIO = 1.0
GOAL_DRAIN_SEGS = 40.0
GOAL_MAX_GAP = 3


def pctl(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Runner:
    """Runs commands as postgres with one clean environment (the server's and archive_command's)."""

    env: dict
    cwd: str
    children: list = field(default_factory=list)

    def run(self, cmd: list[str], *, check: bool = True, timeout: float | None = 600,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, user=PW.pw_uid, group=PW.pw_gid, extra_groups=[], env=self.env,
                              cwd=cwd or self.cwd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def timed_sh(self, command: str, *, cwd: str | None = None) -> tuple[float, int, str, float]:
        """`/bin/sh -c command` as postgres, as PostgreSQL runs archive_command.

        Returns (wall ms, exit code, stderr, CPU ms): the CPU time (user + system) comes from
        wait4() on the shell, so it covers the command and every thread and child it waited for.
        """
        start = time.perf_counter()
        proc = subprocess.Popen(["/bin/sh", "-c", command], user=PW.pw_uid, group=PW.pw_gid, extra_groups=[],
                                env=self.env, cwd=cwd or self.cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = (time.perf_counter() - start) * 1000
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
        return wall, proc.returncode, err, (usage.ru_utime + usage.ru_stime) * 1000

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, user=PW.pw_uid, group=PW.pw_gid, extra_groups=[], env=self.env,
                                cwd=self.cwd, **kw)
        self.children.append(proc)
        return proc


def q(s: str) -> str:
    """Double-quote a path for /bin/sh (inside archive_command's single-quoted setting)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'


# -- the cluster ---------------------------------------------------------------------


CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockdir}'
wal_level = replica
archive_mode = on
archive_command = '/bin/false'
archive_timeout = 0
max_wal_size = '4GB'
max_connections = 50
logging_collector = off
log_min_messages = warning
log_checkpoints = off
"""


class Cluster:
    def __init__(self, base: str, runner: Runner, bindir: str) -> None:
        self.base = base
        self.runner = runner
        self.bindir = bindir
        self.port = free_port()
        self.data = os.path.join(base, "data")
        self.logfile = os.path.join(base, "server.log")
        self.started = False
        self.conninfo = f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres"
        self._conn = None
        self.seg_size = 16 << 20

    def init(self) -> None:
        self.runner.run([f"{self.bindir}/initdb", "-D", self.data, "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                         "--locale=C", "--no-sync", "--no-instructions"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(CONF.format(port=self.port, sockdir=self.base))

    def start(self) -> None:
        self.started = True  # from now on, cleanup stops it (pg_ctl stop is harmless if it never came up)
        self.runner.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "120", "start"])
        self.seg_size = int(self.one("SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'"))

    def stop(self, mode: str = "fast") -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        if self.started:
            # Our own server, by its data directory: never any other cluster.
            self.runner.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"],
                            check=False)
            self.started = False

    def connect(self):
        return psycopg.connect(self.conninfo, autocommit=True)

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def sql(self, query, params=None) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query, params=None):
        return self.sql(query, params)[0][0]

    # WAL bookkeeping

    @property
    def wal_dir(self) -> str:
        return os.path.join(self.data, "pg_wal")

    def ready(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.wal_dir, "archive_status"))
        except FileNotFoundError:
            return []
        return sorted(n[:-6] for n in names if n.endswith(".ready"))

    def segno(self, name: str) -> int:
        per_id = 0x100000000 // self.seg_size
        return int(name[8:16], 16) * per_id + int(name[16:24], 16)

    def lsn_bytes(self) -> int:
        return int(self.one("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))

    def archiver(self) -> dict:
        row = self.sql("SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                       "last_failed_wal, clock_timestamp() FROM pg_stat_archiver")[0]
        return dict(zip(("archived", "last", "last_time", "failed", "last_failed", "now"), row))

    def archiver_cpu_seconds(self) -> float:
        """CPU seconds of the archiver process and of the archive commands it ran (and waited for).

        A detached process (pgBackRest's async archiver) is not in it: the whole machine's CPU is.
        """
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    data = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            fields = data[data.rindex(")") + 2:].split()
            if int(fields[1]) == postmaster and cmdline.startswith(b"postgres: ") and b"archiver" in cmdline:
                return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
        return float("nan")

    def set_archive_command(self, command: str) -> object:
        """ALTER SYSTEM + reload; returns the server's clock at the reload."""
        self.sql(pgsql.SQL("ALTER SYSTEM SET archive_command = {}").format(pgsql.Literal(command)))
        return self.one("SELECT clock_timestamp() FROM (SELECT pg_reload_conf()) r")


# -- the WAL generator -------------------------------------------------------------


SRC_ROWS = 80_000  # ~45 MB of distinct rows: repeats are beyond zstd's window
CHUNK_ROWS = 4_000  # ~2.2 MB of WAL per INSERT statement


def make_tables(cluster: Cluster) -> None:
    cluster.sql("DROP TABLE IF EXISTS src, bulk")
    cluster.sql("CREATE TABLE src (id int NOT NULL, at timestamptz NOT NULL, payload text NOT NULL)")
    # Half random hex (compresses ~2x), half repeated text (compresses away): WAL that zstd
    # shrinks several-fold, in the range of real insert-heavy WAL.
    cluster.sql(f"""INSERT INTO src SELECT g, now() - g * interval '1 second',
                       md5(g::text) || md5(random()::text) || md5(random()::text) || md5((g * 7)::text)
                       || repeat(' pgvault bench row ', 18) || g::text
                    FROM generate_series(1, {SRC_ROWS}) g""")
    cluster.sql("CREATE INDEX ON src (id)")
    cluster.sql("CREATE TABLE bulk (LIKE src)")
    cluster.sql("VACUUM ANALYZE src")


class Loader:
    """Bulk INSERT ... SELECT of wide rows in a loop, optionally paced to a WAL rate."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.offset = 0

    def run(self, *, stop: threading.Event, seconds: float | None = None, rate_bytes: float | None = None,
            until_segments: int | None = None) -> dict:
        with self.cluster.connect() as conn, conn.cursor() as cur:
            def lsn() -> int:
                cur.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
                return int(cur.fetchone()[0])

            start_lsn = lsn()
            start_seg = start_lsn // self.cluster.seg_size
            t0 = time.monotonic()
            statements = 0
            while not stop.is_set():
                elapsed = time.monotonic() - t0
                if seconds is not None and elapsed >= seconds:
                    break
                lo = self.offset
                self.offset = (self.offset + CHUNK_ROWS) % SRC_ROWS
                cur.execute("INSERT INTO bulk SELECT * FROM src WHERE id > %s AND id <= %s", (lo, lo + CHUNK_ROWS))
                statements += 1
                now_lsn = lsn()
                if until_segments is not None and now_lsn // self.cluster.seg_size - start_seg >= until_segments:
                    break
                if rate_bytes:
                    ahead = (now_lsn - start_lsn) / rate_bytes - (time.monotonic() - t0)
                    if ahead > 0:
                        stop.wait(ahead)
            end_lsn = lsn()
            return {"seconds": time.monotonic() - t0, "wal_bytes": end_lsn - start_lsn, "statements": statements}


# -- contestants ---------------------------------------------------------------------


@dataclass
class Contestant:
    name: str
    tool: str  # "pgvault" or "pgbackrest"
    config: str
    store: str  # vault or repository directory
    command: str  # archive_command, %p left in
    spool: str | None = None


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.quick = args.quick
        self.base = tempfile.mkdtemp(prefix="pgvault-bench-archive-", dir="/tmp")
        os.chmod(self.base, 0o755)
        os.chown(self.base, PW.pw_uid, PW.pw_gid)
        self.bindir = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True,
                                     text=True).stdout.strip()
        env = {"PATH": f"{self.bindir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": PW.pw_dir,
               "USER": PG_USER, "LOGNAME": PG_USER}
        self.runner = Runner(env=env, cwd=self.base)
        self.cluster = Cluster(self.base, self.runner, self.bindir)
        self.dev_pgvault = os.path.join(os.path.dirname(sys.executable), "pgvault")
        self.pgvault = self.dev_pgvault
        self.regular_bin: str | None = None
        self.contestants: dict[str, Contestant] = {}
        self.corpus: list[str] = []
        self.results: dict = {"phases": {}}
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    # ---- setup ---------------------------------------------------------------------

    def build_regular_install(self) -> None:
        script = build_regular_install(self.path("regular-venv"))
        self.runner.run([script, "--version"])
        self.regular_bin = os.path.dirname(script)

    def setup(self) -> None:
        a = self.args
        if a.pgvault == "regular":
            log("building a regular (non-editable, byte-compiled) install of pgvault from this checkout")
            try:
                self.build_regular_install()
                self.pgvault = os.path.join(self.regular_bin, "pgvault")
            except Exception as exc:  # noqa: BLE001 - fall back, say so
                log(f"could not build the regular install ({exc}); using the dev venv's pgvault everywhere")
                self.regular_bin = None
        log(f"pgvault for archive_command: {self.pgvault}")
        log(f"initdb + start in {self.base} (port {self.cluster.port})")
        self.cluster.init()
        self.cluster.start()
        self.results["settings"] = {r[0]: r[1] for r in self.cluster.sql(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
            "'full_page_writes', 'wal_level', 'max_wal_size', 'shared_buffers', 'wal_compression', "
            "'wal_segment_size', 'server_version')")}
        scale = a.pgbench_scale or (10 if self.quick else 20)
        log(f"pgbench -i -s {scale}; the bulk-insert source table")
        self.runner.run([f"{self.bindir}/pgbench", "-h", "127.0.0.1", "-p", str(self.cluster.port), "-U", PG_USER,
                         "-i", "-q", "-s", str(scale), "postgres"])
        self.results["pgbench_scale"] = scale
        make_tables(self.cluster)
        self.flush_backlog()
        self.make_contestants()
        self.make_corpus(a.corpus or (12 if self.quick else 40))

    def make_contestants(self) -> None:
        keys = mkdir_pg(self.path("keys"))
        master = os.path.join(keys, "master.key")
        self.runner.run([self.pgvault, "key", "generate", master])
        cipher_pass = secrets.token_hex(32)

        def pgvault(name: str, *, async_: bool, parallel: int = 4, encrypt: bool = False) -> None:
            d = mkdir_pg(self.path(name))
            cfg = os.path.join(d, "pgvault.toml")
            with open(cfg, "w") as f:
                f.write(f'[vault]\nurl = "file://{d}/vault"\n\n'
                        f'[postgres]\nconninfo = "{self.cluster.conninfo}"\ndata_dir = "{self.cluster.data}"\n\n'
                        f'[compression]\nalgorithm = "zstd"\nlevel = 3\n\n'
                        f'[archive]\nasync = {"true" if async_ else "false"}\nspool_dir = "{d}/spool"\n'
                        f'parallel = {parallel}\n')
                if encrypt:
                    f.write(f'\n[encryption]\nkey_file = "{master}"\n')
            chown_pg(d)
            self.runner.run([self.pgvault, "--config", cfg, "init"])
            self.contestants[name] = Contestant(name, "pgvault", cfg, os.path.join(d, "vault"),
                                                f"{q(self.pgvault)} --config {q(cfg)} wal-push %p",
                                                spool=os.path.join(d, "spool"))

        def pgbackrest(name: str, repo: str, *, async_: bool, encrypt: bool = False, create: bool = True) -> None:
            d = mkdir_pg(self.path(name))
            for sub in ("log", "lock", "spool"):
                mkdir_pg(os.path.join(d, sub))
            repo_dir = mkdir_pg(self.path(repo))
            cfg = os.path.join(d, "pgbackrest.conf")
            lines = ["[global]", f"repo1-path={repo_dir}", f"log-path={d}/log", f"lock-path={d}/lock",
                     f"spool-path={d}/spool", "log-level-console=warn", "log-level-stderr=warn",
                     "log-level-file=warn", "compress-type=zst", "compress-level=3"]
            if encrypt:
                lines += ["repo1-cipher-type=aes-256-cbc", f"repo1-cipher-pass={cipher_pass}"]
            if async_:
                lines += ["archive-async=y", "process-max=2"]
            lines += ["", f"[{STANZA}]", f"pg1-path={self.cluster.data}", f"pg1-port={self.cluster.port}",
                      f"pg1-socket-path={self.base}", f"pg1-user={PG_USER}", ""]
            with open(cfg, "w") as f:
                f.write("\n".join(lines))
            os.chmod(cfg, 0o640)
            chown_pg(d)
            if create:
                self.runner.run(["pgbackrest", f"--config={cfg}", f"--stanza={STANZA}", "stanza-create"])
            self.contestants[name] = Contestant(name, "pgbackrest", cfg, repo_dir,
                                                f"pgbackrest --config={q(cfg)} --stanza={STANZA} archive-push %p",
                                                spool=os.path.join(d, "spool"))

        log("pgvault init x5, pgbackrest stanza-create x2")
        pgvault("pgvault-fast", async_=True)
        pgvault("pgvault-sync", async_=False)
        pgvault("pgvault-sync-enc", async_=False, encrypt=True)
        pgvault("pgvault-async-p2", async_=True, parallel=2)
        pgvault("pgvault-async-p4", async_=True, parallel=4)
        pgbackrest("pgbackrest-sync", "repo-plain", async_=False)
        pgbackrest("pgbackrest-sync-enc", "repo-enc", async_=False, encrypt=True)
        pgbackrest("pgbackrest-async", "repo-plain", async_=True, create=False)  # same repo and stanza

    def make_corpus(self, n: int) -> None:
        """Copy n completed segments out of pg_wal while archiving is held back."""
        log(f"writing {n} WAL segments for the corpus")
        self.generate_backlog(n)
        names = [r for r in self.cluster.ready() if len(r) == 24][:n]
        corpus = mkdir_pg(self.path("corpus"))
        for name in names:
            shutil.copyfile(os.path.join(self.cluster.wal_dir, name), os.path.join(corpus, name))
        chown_pg(corpus)
        self.corpus = [os.path.join(corpus, name) for name in names]
        self.flush_backlog()

    # ---- archiving state -----------------------------------------------------------

    def flush_backlog(self, timeout: float = 300) -> None:
        """Mark everything ready as archived (archive_command = /bin/true); then hold archiving back again."""
        c = self.cluster
        c.set_archive_command("/bin/true")
        c.sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout
        while c.ready():
            if time.monotonic() > deadline:
                raise BenchError("the archiver did not drain the backlog with /bin/true")
            time.sleep(0.1)
        c.set_archive_command("/bin/false")
        self.wait_own_processes()
        c.sql("CHECKPOINT")

    def wait_own_processes(self, timeout: float = 120) -> None:
        """Wait for background archivers this run started (pgBackRest's async process) to finish."""
        deadline = time.monotonic() + timeout
        while own_processes(self.base) and time.monotonic() < deadline:
            time.sleep(0.1)

    def generate_backlog(self, n: int) -> list[str]:
        """With archiving failing, write until n more segments are complete; returns the .ready names."""
        Loader(self.cluster).run(stop=self.stop_event, until_segments=n)
        self.cluster.sql("SELECT pg_switch_wal()")
        return self.cluster.ready()

    def settle_archiver(self, timeout: float = 20) -> None:
        """Wait until the failing archiver has given up its retries and sleeps (so a reload wakes it at once)."""
        last = self.cluster.archiver()["failed"]
        stable_since = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.cluster.archiver()["failed"]
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 1.6:
                return

    # ---- phase 1 -------------------------------------------------------------------

    def phase_fast_path(self) -> None:
        from pgvault.spool import Spool

        n = self.args.calls or (20 if self.quick else 30)
        c = self.contestants["pgvault-fast"]
        wal = mkdir_pg(self.path("fastpath", "pg_wal"))
        status = mkdir_pg(os.path.join(wal, "archive_status"))
        k = min(8, len(self.corpus))
        names = [os.path.basename(p) for p in self.corpus[:k]]
        for name in names:
            shutil.copyfile(os.path.join(self.path("corpus"), name), os.path.join(wal, name))
            open(os.path.join(status, name + ".ready"), "w").close()
        chown_pg(self.path("fastpath"))
        spool = Spool(c.spool, "main")

        def command(pgvault: str, name: str) -> str:
            return f"{q(pgvault)} --config {q(c.config)} wal-push {q(os.path.join(wal, name))}"

        # A real push-ahead: the first call pushes its segment and starts the worker that
        # pushes the k-1 others in the background, marking each one in the spool.
        push_ms, rc, err, _ = self.runner.timed_sh(command(self.pgvault, names[0]))
        if rc != 0:
            raise BenchError(f"async wal-push failed: {err}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(spool.has_marker(nm) for nm in names[1:]):
            time.sleep(0.01)
        marked = [nm for nm in names[1:] if spool.has_marker(nm)]
        log(f"async push-ahead of {k} segments: {push_ms:.0f} ms, {len(marked)} markers written")
        if len(marked) != k - 1:
            raise BenchError(f"push-ahead marked {len(marked)} of {k - 1} segments")
        for nm in names:
            os.unlink(os.path.join(status, nm + ".ready"))  # as if PostgreSQL had archived them

        def remark(name: str) -> None:
            spool.mark_pushed(os.path.join(wal, name))
            os.chown(spool.marker_path(name), PW.pw_uid, PW.pw_gid)

        # pgBackRest's fast path: async archive-push with the segment's .ok already in its spool.
        br = self.contestants["pgbackrest-async"]
        ok_dir = mkdir_pg(os.path.join(br.spool, "archive"))
        ok_dir = mkdir_pg(os.path.join(ok_dir, STANZA))
        ok_dir = mkdir_pg(os.path.join(ok_dir, "out"))

        def br_ok(name: str) -> None:
            p = os.path.join(ok_dir, name + ".ok")
            open(p, "w").close()
            os.chown(p, PW.pw_uid, PW.pw_gid)

        br_cmd = br.command.replace("%p", q(os.path.join(wal, names[0])))

        rows: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        variants = [("python -c pass (floor, dev venv)", lambda i: f"{q(sys.executable)} -c pass", None)]
        if self.regular_bin:
            variants.append(("python -c pass (floor, regular install)",
                             lambda i: f"{q(self.regular_bin + '/python')} -c pass", None))
        variants.append(("pgvault wal-push fast path (dev venv, editable)",
                         lambda i: command(self.dev_pgvault, names[1 + i % (k - 1)]), "pgvault"))
        if self.regular_bin:
            variants.append(("pgvault wal-push fast path (regular install)",
                             lambda i: command(self.regular_bin + "/pgvault", names[1 + i % (k - 1)]), "pgvault"))
        variants.append(("pgbackrest archive-push fast path (async, .ok in spool)", lambda i: br_cmd, "pgbackrest"))

        # The first k-1 pgvault calls of the first pgvault variant consume the real push-ahead markers.
        real_left = set(marked)
        for label, _, _ in variants:
            rows[label], cpu[label] = [], []
        for i in range(-1, n):  # i = -1: one untimed warm-up call each
            for label, make, kind in variants:
                cmd = make(max(i, 0))
                if kind == "pgvault":
                    name = cmd.rsplit("/", 1)[1].rstrip('"')
                    if name in real_left:
                        real_left.discard(name)
                    else:
                        remark(name)
                elif kind == "pgbackrest":
                    br_ok(names[0])
                ms, rc, err, cpu_ms = self.runner.timed_sh(cmd)
                if rc != 0:
                    raise BenchError(f"{label}: exit {rc}: {err}")
                if kind == "pgvault" and spool.has_marker(name):
                    raise BenchError(f"{label}: the marker of {name} is still there: the fast path was not taken")
                if i >= 0:
                    rows[label].append(ms)
                    cpu[label].append(cpu_ms)

        # For reference: the same call with no marker (the full path finds it already in the vault).
        label = "pgvault wal-push, no marker (full path, already in vault)"
        rows[label], cpu[label] = [], []
        for i in range(-1, 5):
            ms, rc, err, cpu_ms = self.runner.timed_sh(command(self.pgvault, names[0]))
            if rc != 0:
                raise BenchError(f"wal-push (full path, already archived): exit {rc}: {err}")
            if i >= 0:
                rows[label].append(ms)
                cpu[label].append(cpu_ms)
        self.results["phases"]["fast_path"] = {
            "calls": n, "push_ahead_ms": push_ms, "push_ahead_segments": k,
            "rows": {label: {"median_ms": statistics.median(v), "p10_ms": pctl(v, 0.1), "p90_ms": pctl(v, 0.9),
                             "cpu_ms": statistics.median(cpu[label]),
                             "samples_ms": [round(x, 2) for x in v]} for label, v in rows.items()},
        }

    # ---- phase 2 -------------------------------------------------------------------

    def phase_sync_push(self) -> None:
        order = ["pgvault-sync", "pgbackrest-sync", "pgvault-sync-enc", "pgbackrest-sync-enc"]
        stage = mkdir_pg(self.path("stage"))
        samples: dict[str, list[float]] = {name: [] for name in order}
        cpu: dict[str, list[float]] = {name: [] for name in order}
        log(f"sync push of {len(self.corpus)} segments x {len(order)} contestants")
        for i, src in enumerate(self.corpus):
            name = os.path.basename(src)
            rot = order[i % len(order):] + order[:i % len(order)]  # rotate who goes first
            for cname in rot:
                c = self.contestants[cname]
                d = mkdir_pg(os.path.join(stage, cname))
                dst = os.path.join(d, name)
                shutil.copyfile(src, dst)
                os.chown(dst, PW.pw_uid, PW.pw_gid)
                os.chmod(dst, 0o600)
                ms, rc, err, cpu_ms = self.runner.timed_sh(c.command.replace("%p", q(dst)))
                if rc != 0:
                    raise BenchError(f"{cname} push of {name}: exit {rc}: {err}")
                if "already" in err.lower():
                    raise BenchError(f"{cname}: {name} was already in the store: {err}")
                samples[cname].append(ms)
                cpu[cname].append(cpu_ms)
                os.unlink(dst)
        raw = len(self.corpus) * self.cluster.seg_size
        rows = {}
        for cname, v in samples.items():
            stored = dir_bytes(os.path.join(self.contestants[cname].store,
                                            "main/wal" if cname.startswith("pgvault") else f"archive/{STANZA}"))
            rows[cname] = {"median_ms": statistics.median(v), "p10_ms": pctl(v, 0.1), "p90_ms": pctl(v, 0.9),
                           "mb_per_s": self.cluster.seg_size / 1e6 / (statistics.median(v) / 1000),
                           "cpu_ms": statistics.median(cpu[cname]),
                           "stored_over_raw": stored / raw, "samples_ms": [round(x, 1) for x in v]}
        self.results["phases"]["sync_push"] = {"segments": len(self.corpus), "rows": rows}

    # ---- phase 3 -------------------------------------------------------------------

    def phase_drain(self) -> None:
        n = self.args.backlog or (20 if self.quick else 40)
        names = ["pgvault-async-p2", "pgvault-async-p4", "pgbackrest-async", "pgvault-sync", "pgbackrest-sync"]
        rounds = self.args.drain_rounds or (1 if self.quick else 2)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        # Every other round in reverse order, so no contestant always follows the same one.
        schedule = [(r, cname) for r in range(rounds) for cname in (names if r % 2 == 0 else names[::-1])]
        for rnd, cname in schedule:
            c = self.contestants[cname]
            log(f"drain round {rnd + 1}/{rounds}: {cname}: writing {n} segments with archiving held back")
            self.flush_backlog()
            ready = self.generate_backlog(n)
            target = ready[-1]
            self.settle_archiver()
            before = self.cluster.archiver()
            cpu0, arch0 = cpu_busy_seconds(), self.cluster.archiver_cpu_seconds()
            t0 = self.cluster.set_archive_command(c.command)
            wall0 = time.monotonic()
            deadline = wall0 + 600
            timeline = []  # (seconds since the reload, segments archived so far), at each change
            while True:
                st = self.cluster.archiver()
                done = st["archived"] - before["archived"]
                if done and (not timeline or timeline[-1][1] != done):
                    timeline.append((round((st["last_time"] - t0).total_seconds(), 3), done))
                if st["last"] is not None and st["last"] >= target:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{cname}: {target} not archived after 600 s: {st}")
                time.sleep(0.005)
            cpu = cpu_busy_seconds() - cpu0
            arch_cpu = self.cluster.archiver_cpu_seconds() - arch0
            wall = time.monotonic() - wall0
            seconds = (st["last_time"] - t0).total_seconds()
            first = timeline[0][0] if timeline else seconds
            rest = (len(ready) - 1) / (seconds - first) if seconds > first else float("nan")
            runs[cname].append({"segments": len(ready), "seconds": seconds, "wall_seconds": wall,
                           "segments_per_s": len(ready) / seconds, "first_archived_s": first,
                           "rest_segments_per_s": rest, "cpu_ms_per_segment": cpu * 1000 / len(ready),
                           "archiver_cpu_ms_per_segment": arch_cpu * 1000 / len(ready),
                           "archived": st["archived"] - before["archived"], "failed": st["failed"] - before["failed"],
                           "timeline": timeline})
            log(f"drain: {cname}: {len(ready)} segments in {seconds:.2f} s = {len(ready) / seconds:.1f} segments/s "
                f"(first after {first:.2f} s, then {rest:.1f}/s; {cpu * 1000 / len(ready):.0f} CPU ms/segment)")
        self.flush_backlog()
        rows = {}
        for cname, rs in runs.items():
            # The best round: interference (another process, writeback) only ever slows a drain down.
            rows[cname] = dict(max(rs, key=lambda r: r["segments_per_s"]))
            rows[cname]["runs_segments_per_s"] = [round(r["segments_per_s"], 1) for r in rs]
            rows[cname]["runs"] = rs
        self.results["phases"]["drain"] = {"rounds": rounds, "rows": rows}

    # ---- phase 4 -------------------------------------------------------------------

    def sample_gaps(self, stop: threading.Event, out: list) -> None:
        with self.cluster.connect() as conn, conn.cursor() as cur:
            next_at = time.monotonic()
            while not stop.is_set():
                cur.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), last_archived_wal, archived_count, "
                            "failed_count, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_archiver")
                cur_name, last, archived, failed, lsn = cur.fetchone()
                gap = self.cluster.segno(cur_name) - self.cluster.segno(last) if last else None
                out.append({"t": time.monotonic(), "gap": gap, "archived": archived, "failed": failed,
                            "lsn": int(lsn)})
                next_at += 1.0
                stop.wait(max(0.0, next_at - time.monotonic()))

    def wait_caught_up(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            cur_name, last = self.cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn()), last_archived_wal "
                                              "FROM pg_stat_archiver")[0]
            if last and self.cluster.segno(last) >= self.cluster.segno(cur_name) - 1:
                return time.monotonic() - t0
            time.sleep(0.05)
        return float("inf")

    def sustained_run(self, c: Contestant, load: str, seconds: float) -> dict:
        self.flush_backlog()
        self.cluster.sql("TRUNCATE bulk")
        self.cluster.sql("CHECKPOINT")
        self.cluster.set_archive_command(c.command)
        time.sleep(0.5)
        samples: list = []
        checkpoints = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        ckpt0 = self.cluster.one(checkpoints)
        cpu0, t_cpu0 = cpu_busy_seconds(), time.monotonic()
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample_gaps, args=(stop, samples), daemon=True)
        self.threads.append(sampler)
        sampler.start()
        extra = {}
        try:
            if load == "insert":
                rate = self.args.insert_rate * self.cluster.seg_size
                extra = Loader(self.cluster).run(stop=self.stop_event, seconds=seconds, rate_bytes=rate)
            else:
                proc = self.runner.popen([f"{self.bindir}/pgbench", "-h", "127.0.0.1", "-p", str(self.cluster.port),
                                          "-U", PG_USER, "-c", "8", "-j", "2", "-n", "-T", str(int(seconds)),
                                          "postgres"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                out, _ = proc.communicate(timeout=seconds + 120)
                if proc.returncode != 0:
                    raise BenchError(f"pgbench failed:\n{out}")
                tps = [ln for ln in out.splitlines() if ln.startswith("tps =")]
                extra = {"tps": float(tps[0].split()[2]) if tps else None}
        except BaseException:
            stop.set()
            sampler.join()
            raise
        load_end, cpu_end = time.monotonic(), cpu_busy_seconds()
        try:
            catch_up = self.wait_caught_up()  # while the sampler still samples
        finally:
            time.sleep(max(0.0, load_end + 1.0 - time.monotonic()))
            stop.set()
            sampler.join()
        cpu_pct = (cpu_end - cpu0) / (load_end - t_cpu0) / os.cpu_count() * 100
        ckpts = self.cluster.one(checkpoints) - ckpt0
        gaps = [s["gap"] for s in samples if s["gap"] is not None]
        during = [s for s in samples if s["t"] <= load_end + 0.5]  # rates over the load only
        dur = during[-1]["t"] - during[0]["t"]
        seg = self.cluster.seg_size
        return {
            "seconds": dur,
            "generated_segments_per_s": (during[-1]["lsn"] - during[0]["lsn"]) / seg / dur,
            "archived_segments_per_s": (during[-1]["archived"] - during[0]["archived"]) / dur,
            "failed": samples[-1]["failed"] - samples[0]["failed"],
            "gap_max": max(gaps), "gap_median": statistics.median(gaps), "gap_p90": pctl(gaps, 0.9),
            "catch_up_seconds": catch_up, "cpu_busy_pct": cpu_pct, "checkpoints": ckpts, "gaps": gaps, **extra,
        }

    def phase_sustained(self) -> None:
        insert_s = self.args.insert_seconds or (15 if self.quick else 45)
        pgbench_s = self.args.pgbench_seconds or (15 if self.quick else 60)
        names = ["pgvault-async-p2", "pgvault-async-p4", "pgbackrest-async"]
        rows: dict = {"insert": {}, "pgbench": {}}
        for cname in names:
            for load, secs in (("insert", insert_s), ("pgbench", pgbench_s)):
                log(f"sustained: {cname}: {load} load for {secs} s")
                r = self.sustained_run(self.contestants[cname], load, secs)
                rows[load][cname] = r
                log(f"sustained: {cname}: {load}: generated {r['generated_segments_per_s']:.1f} seg/s, archived "
                    f"{r['archived_segments_per_s']:.1f} seg/s, gap max {r['gap_max']} median {r['gap_median']}, "
                    f"caught up {r['catch_up_seconds']:.1f} s after")
        self.flush_backlog()
        self.results["phases"]["sustained"] = {"insert_seconds": insert_s, "pgbench_seconds": pgbench_s,
                                               "insert_target_segments_per_s": self.args.insert_rate, "rows": rows}

    # ---- cleanup -------------------------------------------------------------------

    def cleanup(self) -> None:
        self.stop_event.set()
        for proc in self.runner.children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            self.cluster.stop(mode="immediate")
        except Exception as exc:  # noqa: BLE001
            log(f"cleanup: stopping the server failed: {exc}")
        # Whatever this run started that outlived the server (pgBackRest's detached async
        # archiver): only processes whose command line names this run's directory, by pid.
        for pid in own_processes(self.base):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while own_processes(self.base) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in own_processes(self.base):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.args.keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def own_processes(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (this run's directory), but not ours."""
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "postgres" not in cmdline.split("\0")[0]:
            pids.append(int(entry))
    return pids


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


# -- report --------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], title: str) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title, fmt(cells[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells[1:]]
    return "\n".join(out)


def ok(b: bool) -> str:
    return "ok" if b else "MISS"


def report(res: dict) -> str:
    parts = []
    m = res["machine"]
    parts.append(f"machine: {m['cpus']} CPUs, {m['platform']}, PostgreSQL {res['settings'].get('server_version')}, "
                 f"{m['pgbackrest']}; pgvault: {res['pgvault']}")
    s = res["settings"]
    parts.append("server: " + ", ".join(f"{k}={v}" for k, v in sorted(s.items()) if k != "server_version"))
    ns = m.get("noise_at_start") or {}
    parts.append(f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
                 f"other processes at start: {ns.get('mean_pct', 0):.0f}% of all CPUs")
    ph = res["phases"]

    def noise_line(p: dict) -> str:
        n = p.get("noise")
        if not n:
            return ""
        top = f" (worst second: {', '.join(n['top'])})" if n["max_pct"] >= 5 and n["top"] else ""
        return (f"\n   noise: other processes used {n['mean_pct']:.0f}% of all CPUs on average, "
                f"{n['max_pct']:.0f}% at worst{top}; load average after: {p.get('loadavg_after')}")

    if "fast_path" in ph:
        f = ph["fast_path"]
        rows = f["rows"]
        br = next((v["median_ms"] for k, v in rows.items() if k.startswith("pgbackrest")), None)
        out = []
        for label, v in rows.items():
            goal = ""
            if "fast path" in label and label.startswith("pgvault"):
                goal = f"<= {GOAL_FAST_MS:.0f}: {ok(v['median_ms'] <= GOAL_FAST_MS)}"
            ratio = f"{v['median_ms'] / br:.2f}" if br and label.startswith("pgvault") else ""
            out.append([label, f"{v['median_ms']:.1f}", f"{v['p10_ms']:.1f}", f"{v['p90_ms']:.1f}",
                        f"{v['cpu_ms']:.1f}", ratio, goal])
        parts.append(table(["contestant", "median ms", "p10", "p90", "CPU ms", "/pgbackrest", "goal"], out,
                           f"\n1. archive_command fast path: segment already pushed ahead ({f['calls']} calls each, "
                           "interleaved; /bin/sh -c as postgres)" + noise_line(f)))

    if "sync_push" in ph:
        f = ph["sync_push"]
        r = f["rows"]
        out = []
        for name, ref in (("pgvault-sync", "pgbackrest-sync"), ("pgbackrest-sync", None),
                          ("pgvault-sync-enc", "pgbackrest-sync-enc"), ("pgbackrest-sync-enc", None)):
            v = r[name]
            ratio = v["median_ms"] / r[ref]["median_ms"] if ref else None
            label = {"pgvault-sync": "pgvault sync, zstd-1 (WAL default)", "pgbackrest-sync": "pgbackrest sync, zst-3",
                     "pgvault-sync-enc": "pgvault sync, zstd-1 + AES-256-GCM",
                     "pgbackrest-sync-enc": "pgbackrest sync, zst-3 + aes-256-cbc"}[name]
            out.append([label, f"{v['median_ms']:.0f}", f"{v['p10_ms']:.0f}", f"{v['p90_ms']:.0f}",
                        f"{v['cpu_ms']:.0f}", f"{v['mb_per_s']:.0f}", f"{v['stored_over_raw']:.3f}",
                        f"{ratio:.2f}" if ratio else "", f"<= 1.0: {ok(ratio <= GOAL_SYNC_RATIO)}" if ratio else ""])
        parts.append(table(["contestant", "median ms", "p10", "p90", "CPU ms", "MB/s", "stored/raw", "/pgbackrest",
                            "goal"], out,
                           f"\n2. sync push of one 16 MB segment ({f['segments']} distinct real segments each)"
                           + noise_line(f)))

    if "drain" in ph:
        r = ph["drain"]["rows"]
        out = []
        labels = {"pgvault-async-p2": ("pgvault async, parallel 2", "pgbackrest-async"),
                  "pgvault-async-p4": ("pgvault async, parallel 4", "pgbackrest-async"),
                  "pgbackrest-async": ("pgbackrest async, process-max 2", None),
                  "pgvault-sync": ("pgvault sync (reference)", "pgbackrest-sync"),
                  "pgbackrest-sync": ("pgbackrest sync (reference)", None)}
        for name, v in r.items():
            label, ref = labels[name]
            ratio = v["segments_per_s"] / r[ref]["segments_per_s"] if ref in r else None
            goal = f">= {GOAL_DRAIN_SEGS:.0f}: {ok(v['segments_per_s'] >= GOAL_DRAIN_SEGS)}" \
                if name.startswith("pgvault-async") else ""
            out.append([label, v["segments"], f"{v['seconds']:.2f}", f"{v['segments_per_s']:.1f}",
                        " ".join(f"{x:.1f}" for x in v["runs_segments_per_s"]),
                        f"{v['first_archived_s']:.2f}", f"{v['rest_segments_per_s']:.1f}",
                        f"{v['cpu_ms_per_segment']:.0f}",
                        "(detached)" if name == "pgbackrest-async" else f"{v['archiver_cpu_ms_per_segment']:.0f}",
                        v["failed"], f"{ratio:.2f}" if ratio else "", goal])
        parts.append(table(["contestant", "segments", "seconds", "segments/s", "each round", "1st at s", "then seg/s",
                            "CPU ms/seg", "cmd CPU ms/seg", "failed", "/pgbackrest", "goal"], out,
                           f"\n3. draining a backlog of .ready segments (reload -> last one archived, server clock; "
                           f"best of {ph['drain'].get('rounds', 1)} rounds;\n   CPU = whole machine; "
                           f"cmd CPU = the archiver and the archive commands it waited for)" + noise_line(ph["drain"])))

    if "sustained" in ph:
        f = ph["sustained"]
        out = []
        for load, rows in f["rows"].items():
            ref = rows.get("pgbackrest-async")
            for name, v in rows.items():
                ratio = (v["gap_max"] / ref["gap_max"]) if ref and ref["gap_max"] and name != "pgbackrest-async" else None
                load_label = (f"insert {f['insert_seconds']}s" if load == "insert" else f"pgbench -c8 {f['pgbench_seconds']}s")
                short = " (<8!)" if load == "insert" and v["generated_segments_per_s"] < 8 else ""
                out.append([load_label, name, f"{v['generated_segments_per_s']:.2f}{short}",
                            f"{v['archived_segments_per_s']:.2f}", v["gap_max"], f"{v['gap_median']:.0f}",
                            f"{v['gap_p90']:.0f}", f"{v['catch_up_seconds']:.1f}", f"{v['cpu_busy_pct']:.0f}",
                            v["checkpoints"],
                            f"{v['tps']:.0f}" if v.get("tps") else "", f"{ratio:.2f}" if ratio else "",
                            f"<= {GOAL_MAX_GAP}: {ok(v['gap_max'] <= GOAL_MAX_GAP)}"])
        parts.append(table(["load", "contestant", "gen seg/s", "arch seg/s", "gap max", "median", "p90",
                            "catch-up s", "CPU %", "ckpts", "tps", "max/pgbackrest", "goal"], out,
                           f"\n4. sustained load (gap = current segment - last archived; 1 = all completed ones "
                           f"archived; insert paced at {f['insert_target_segments_per_s']} seg/s; CPU % = whole "
                           "machine)" + noise_line(f)))
    return "\n".join(parts)


class NoiseMonitor:
    """Samples once a second the CPU used by processes that are not this run's: the noise.

    This run's processes: this one and its descendants, and anything whose command line (or an
    ancestor's) names this run's directory (the server and its backends, pgBackRest's async process).
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.samples: list[tuple[float, float, list[str]]] = []  # (time, % of all CPUs, top foreign processes)
        self._ours: dict[tuple[int, int], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _scan() -> dict[int, tuple[int, int, int, str]]:
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    data = f.read()
                comm = data[data.index("(") + 1:data.rindex(")")]
                fields = data[data.rindex(")") + 2:].split()
                # ppid, utime + stime, start time (tells a reused pid apart), comm
                out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]), comm)
            except (OSError, ValueError, IndexError):
                continue
        return out

    def _is_ours(self, pid: int, procs: dict) -> bool:
        key = (pid, procs[pid][2])
        if key in self._ours:
            return self._ours[key]
        ours = False
        if pid == os.getpid():
            ours = True
        else:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = self.marker.encode() in f.read()
            except OSError:
                pass
            parent = procs[pid][0]
            if not ours and parent > 1 and parent in procs and parent != pid:
                ours = self._is_ours(parent, procs)
        self._ours[key] = ours
        return ours

    def _run(self) -> None:
        prev, t_prev = self._scan(), time.monotonic()
        ncpu = os.cpu_count() or 1
        while not self._stop.wait(1.0):
            now, t_now = self._scan(), time.monotonic()
            foreign = []
            for pid, (_, ticks, started, comm) in now.items():
                old = prev.get(pid)
                if old is None or old[2] != started or self._is_ours(pid, now):
                    continue
                if ticks > old[1]:
                    foreign.append((ticks - old[1], f"{comm}[{pid}]"))
            total = sum(t for t, _ in foreign) / self._hz / (t_now - t_prev) / ncpu * 100
            top = [f"{name} {t / self._hz / (t_now - t_prev) * 100:.0f}%" for t, name in sorted(foreign, reverse=True)[:3]]
            self.samples.append((t_now, total, top))
            prev, t_prev = now, t_now

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def window(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1 + 1.0]
        if not inside:
            return {"mean_pct": 0.0, "max_pct": 0.0, "top": []}
        worst = max(inside, key=lambda s: s[1])
        return {"mean_pct": round(statistics.mean(s[1] for s in inside), 1), "max_pct": round(worst[1], 1),
                "top": worst[2]}

    def wait_idle(self, max_seconds: float, *, threshold: float = 5.0, quiet: float = 20.0) -> bool:
        """Wait (up to max_seconds) until other processes stay under threshold % CPU for `quiet` seconds."""
        deadline = time.monotonic() + max_seconds
        told = 0.0
        while time.monotonic() < deadline:
            recent = [s for s in self.samples if s[0] >= time.monotonic() - quiet]
            if len(recent) >= quiet - 2 and all(s[1] < threshold for s in recent):
                return True
            if time.monotonic() - told > 60 and self.samples:
                log(f"waiting for the machine to be idle: others use {self.samples[-1][1]:.0f}% "
                    f"({', '.join(self.samples[-1][2])})")
                told = time.monotonic()
            time.sleep(1.0)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run: fewer segments and calls, 15 s loads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table to stderr)")
    parser.add_argument("--pgvault", choices=("regular", "dev"), default="regular",
                        help="which pgvault install archive_command runs (default: a regular install built from "
                             "this checkout; dev: the editable one of this venv)")
    parser.add_argument("--phases", default="1234", help="which phases to run (default 1234)")
    parser.add_argument("--calls", type=int, help="fast-path calls per contestant (default 30, quick 20)")
    parser.add_argument("--corpus", type=int, help="segments in the sync-push corpus (default 40, quick 12)")
    parser.add_argument("--backlog", type=int, help="segments in each drained backlog (default 40, quick 20)")
    parser.add_argument("--drain-rounds", type=int, help="rounds of the backlog drain (default 2, quick 1)")
    parser.add_argument("--insert-rate", type=float, default=9.0, help="bulk insert pace, segments/s (default 9)")
    parser.add_argument("--insert-seconds", type=int, help="bulk insert load duration (default 45, quick 15)")
    parser.add_argument("--pgbench-seconds", type=int, help="pgbench duration (default 60, quick 15)")
    parser.add_argument("--pgbench-scale", type=int, help="pgbench scale (default 20, quick 10)")
    parser.add_argument("--wait-idle", type=int, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for other processes to stay under 5%% CPU for 20 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (the server is stopped)")
    args = parser.parse_args()

    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL and archive_command run as the postgres user")
    for tool in ("pg_config", "pgbackrest"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found in PATH (apt-get install -y pgbackrest)")

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT is Python's KeyboardInterrupt already (unless ignored, e.g. in a background job);
    # a signal ignored on purpose (nohup: SIGHUP) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)

    bench = Bench(args)
    noise = NoiseMonitor(bench.base)
    noise.start()
    bench.results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "pgbackrest": subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.strip(),
    }
    started = time.monotonic()
    code = 0
    try:
        if args.wait_idle:
            log(f"waiting up to {args.wait_idle} s for other processes to go quiet")
            if not noise.wait_idle(args.wait_idle):
                log("the machine did not go quiet; running anyway (see the noise lines)")
        time.sleep(2.2)
        bench.results["machine"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
        bench.results["machine"]["noise_at_start"] = noise.window(time.monotonic() - 2.5, time.monotonic())
        bench.setup()
        bench.results["pgvault"] = bench.pgvault
        phases = [("1", "fast_path", "phase 1: fast path", bench.phase_fast_path),
                  ("2", "sync_push", "phase 2: sync push", bench.phase_sync_push),
                  ("3", "drain", "phase 3: backlog drain", bench.phase_drain),
                  ("4", "sustained", "phase 4: sustained load", bench.phase_sustained)]
        for digit, key, title, run in phases:
            if digit not in args.phases:
                continue
            log(title)
            t0 = time.monotonic()
            run()
            bench.results["phases"][key]["noise"] = noise.window(t0, time.monotonic())
            bench.results["phases"][key]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except BenchError as exc:
        log(f"error: {exc}")
        if bench.cluster.started:
            try:
                with open(bench.cluster.logfile) as f:
                    log("server log tail:\n" + f.read()[-3000:])
            except OSError:
                pass
        code = 1
    finally:
        noise.stop()
        bench.cleanup()
    bench.results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    bench.results["seconds"] = round(time.monotonic() - started, 1)
    if bench.results["phases"]:
        text = report(bench.results)
        if args.json:
            print(text, file=sys.stderr)
            print(json.dumps(bench.results, indent=2, default=str))
        else:
            print(text)
            print(f"\n(run took {bench.results['seconds']:.0f} s)")
    sys.exit(code)


if __name__ == "__main__":
    main()
