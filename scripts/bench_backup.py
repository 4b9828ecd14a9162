#!/usr/bin/env python3
"""Benchmark physical backups: pgvault full and incremental next to pgBackRest and pg_basebackup, in one run.

Run as root with the venv's python (it needs psycopg):

    sudo /opt/pgvault-dev/venv/bin/python scripts/bench_backup.py [--scale 100 | --quick] [--json] [--keep DIR]

One throwaway cluster: initdb as the `postgres` OS user in a postgres-owned
temporary directory, a free loopback port, production defaults (fsync = on,
full_page_writes = on, no data checksums) except max_wal_size = 4GB, and
`pgbench -i -s SCALE` (100: about 1.5 GB). Then archiving is switched on.
Each tool's backup waits for the WAL it needs to reach its own store (pgvault
always; pgBackRest with its default archive-check=y), so the comparison is like
for like: neither skips the wait. With `--archive own` (the default) each tool
is timed as its users run it: before a tool's backup, archive_command is set to
that tool's push alone (`pgvault wal-push` or `pgbackrest archive-push`; both
side by side around pg_basebackup, which streams its own WAL), so no backup
shares the machine with the other tool's pushes. `--archive both` keeps one
archive_command for the whole run, starting both pushes side by side and
succeeding only if both did: every backup then also pays for the other tool's
push of each segment it switches (the bench before 2026-11-28).
Contestants, all with zstd level 3 and 2 processes or threads:

  pgvault full      `pgvault backup --type full --json`: [backup] parallel = 2,
                    a local vault (`pgvault init`), synchronous wal-push
  pgBackRest full   `pgbackrest backup --type=full`: compress-type=zst,
                    compress-level=3, process-max=2, start-fast=y, a local repo
                    and its own stanza, synchronous archive-push
  pg_basebackup     `-Ft --compress=server-zstd:workers=2 -c fast` into a temporary
                    directory: the single-stream reference (WAL streamed alongside)
  pgvault incr      after `UPDATE pgbench_accounts SET abalance = abalance + 1
                    WHERE aid <= SCALE * 1000` (1% of the rows, a contiguous range)
                    and CHECKPOINT: `pgvault backup --type incr --json`
  pgBackRest incr   after the same update: `--type=incr` (pgBackRest 2.45 has no
                    block incremental: it copies every changed file whole)

Each round runs every contestant once, in an order that rotates from round to
round: the fulls, then the update, then the incrementals, each on the full of
its own tool taken in that round. Before every timed backup the archiver has no
segment waiting (.ready) and, unless --wait-idle 0, the machine is quiet.
Wall time is from spawning the tool (as postgres) to its exit, interpreter
start included; peak RSS comes from wait4() on it (the largest of the tool and
the children it waited for); sizes are the bytes of the backup's own directory
in the vault or repository (WAL left out on both sides). Medians of --rounds.

Goals (PASS/MISS): pgvault full <= 0.8 x pgBackRest full; pgvault's backup
<= 1.05 x pgBackRest's in size; pgvault incr <= 25% of pgvault full's wall time
and <= 10% of its size; pgvault peak RSS <= 256 MB.

pgvault runs by default from a regular (non-editable, byte-compiled) install
built in the temporary directory from this checkout, as scripts/setup-dev.sh
installs it; `--pgvault dev` uses the dev venv's editable install instead.
`--contestants pgvault` measures pgvault alone, archiving to pgvault alone (as in
production: no pgBackRest archive-push beside each segment's push). `--keep DIR` builds the cluster
in DIR and leaves it there, stopped, for inspection; a later run with the same
DIR reuses it (initdb skipped; pgbench tables, vault and repository made anew). Ctrl-C or SIGTERM stop what the run started (only the server
it created, by its data directory) and remove what it made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psycopg
from benchlib import PG_USER, PW, BenchError, build_regular_install, chown_pg, dir_bytes, free_port, log, mkdir_pg
from psycopg import sql as pgsql

STANZA = "bench"
GOAL_FULL_VS_PGBACKREST = 0.80
GOAL_SIZE_VS_PGBACKREST = 1.05
GOAL_INCR_TIME = 0.25
GOAL_INCR_SIZE = 0.10
GOAL_RSS_MB = 256
CONTESTANTS = ("pgvault", "pgbackrest", "basebackup")


def machine_busy(seconds: float) -> float:
    """Share of all CPUs busy (idle and iowait excluded) over the next ``seconds``."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields[:8]) - fields[3] - fields[4], sum(fields[:8])

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def own_processes(marker: str) -> list[int]:
    """Pids of pgvault or pgBackRest processes whose command line names ``marker`` (this run's directory).

    Never this process or its ancestors (whose command line may name the directory too), never a server.
    """
    pids, mine = [], _ancestors()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        tool = any(os.path.basename(a) in ("pgvault", "pgbackrest") for a in argv[:2])
        if tool and any(marker in a for a in argv):
            pids.append(int(entry))
    return pids


@dataclass
class Run:
    """One timed command: wall seconds, exit code, output, peak RSS."""

    wall: float
    code: int
    stdout: str
    stderr: str
    maxrss_mb: float


@dataclass
class Runner:
    """Runs commands as postgres with one clean environment."""

    env: dict
    cwd: str

    def run(self, cmd: list[str], *, check: bool = True, timeout: float | None = 3600) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, user=PW.pw_uid, group=PW.pw_gid, extra_groups=[], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def timed(self, cmd: list[str], *, scratch: str) -> Run:
        """Run ``cmd`` as postgres; its output goes to files so that wait4() (not communicate) reaps it."""
        out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
        with open(out_path, "w+") as out, open(err_path, "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, user=PW.pw_uid, group=PW.pw_gid, extra_groups=[], env=self.env,
                                    cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            run = Run(wall, proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024)
        if run.code != 0:
            raise BenchError(f"{' '.join(cmd)} failed (exit {run.code}):\n{run.stdout}{run.stderr}")
        return run


CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockdir}'
wal_level = replica
archive_mode = on
archive_command = '/bin/true'
archive_timeout = 0
max_wal_size = '4GB'
max_wal_senders = 10
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

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.data, "PG_VERSION"))

    def init(self) -> None:
        self.runner.run([f"{self.bindir}/initdb", "-D", self.data, "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                         "--locale=C", "--no-sync", "--no-instructions"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(CONF.format(port=self.port, sockdir=self.base))

    def start(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            raise BenchError(f"a server seems to run in {self.data}; stop it first (this script only stops its own)")
        self.started = True  # from now on, cleanup stops it (pg_ctl stop is harmless if it never came up)
        # The port of a kept cluster is chosen anew: the one in postgresql.conf may be taken by now.
        self.runner.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "120",
                         "-o", f"-p {self.port} -k {self.base}", "start"])

    def stop(self, mode: str = "fast") -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing on the way out
                pass
            self._conn = None
        if self.started:
            # Our own server, by its data directory: never any other cluster.
            self.runner.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "120", "stop"],
                            check=False)
            self.started = False

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=True)
        return self._conn

    def sql(self, query, params=None) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query, params=None):
        return self.sql(query, params)[0][0]

    def ready(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.data, "pg_wal", "archive_status"))
        except FileNotFoundError:
            return []
        return sorted(n[:-6] for n in names if n.endswith(".ready"))

    def wait_archived(self, timeout: float = 600) -> None:
        """Until no segment waits for the archiver; fails on an archive failure after the wait began."""
        failed = self.one("SELECT failed_count FROM pg_stat_archiver")
        deadline = time.monotonic() + timeout
        while self.ready():
            if self.one("SELECT failed_count FROM pg_stat_archiver") != failed:
                raise BenchError(f"archive_command failed; see {self.logfile}")
            if time.monotonic() > deadline:
                raise BenchError(f"the archiver did not catch up within {timeout:g} s")
            time.sleep(0.05)


# archive_command: push %p to pgvault and pgBackRest side by side; succeed only if both did.
# Inline (not a script) because pgBackRest checks that archive_command names pgbackrest.
ARCHIVE_COMMAND = ('{pgvault} --config {pgvault_cfg} wal-push "%p" & a=$!; '
                   'pgbackrest --config={pgbackrest_cfg} --stanza={stanza} archive-push "%p"; b=$?; '
                   'wait $a && [ $b -eq 0 ]')
ARCHIVE_COMMAND_PGVAULT = '{pgvault} --config {pgvault_cfg} wal-push "%p"'
ARCHIVE_COMMAND_PGBACKREST = 'pgbackrest --config={pgbackrest_cfg} --stanza={stanza} archive-push "%p"'


@dataclass
class Sample:
    wall: float
    size: int
    maxrss_mb: float
    detail: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.scale = 20 if args.quick and args.scale is None else (args.scale or 100)
        if args.keep:
            self.base = os.path.abspath(args.keep)
            os.makedirs(self.base, exist_ok=True)
        else:
            self.base = tempfile.mkdtemp(prefix="pgvault-bench-backup-", dir="/tmp")
        os.chmod(self.base, 0o755)
        os.chown(self.base, PW.pw_uid, PW.pw_gid)
        self.bindir = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True,
                                     text=True).stdout.strip()
        self.pgvault = os.path.join(os.path.dirname(sys.executable), "pgvault")
        env = {"PATH": f"{os.path.dirname(self.pgvault)}:{self.bindir}:/usr/local/bin:/usr/bin:/bin",
               "LANG": "C.UTF-8", "HOME": PW.pw_dir, "USER": PG_USER, "LOGNAME": PG_USER}
        self.runner = Runner(env=env, cwd=self.base)
        self.cluster = Cluster(self.base, self.runner, self.bindir)
        self.contestants = [c for c in CONTESTANTS if c in args.contestants.split(",")]
        self.samples: dict[str, list[Sample]] = {}
        self.results: dict = {"scale": self.scale, "rounds": args.rounds, "contestants": self.contestants,
                              "archive": args.archive}

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    # ---- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        if self.args.pgvault == "regular":
            self.pgvault = build_regular_install(self.path("pgvault-venv"))
            self.runner.env["PATH"] = f"{os.path.dirname(self.pgvault)}:{self.runner.env['PATH']}"
        self.runner.run([self.pgvault, "--version"])
        log(f"pgvault: {self.pgvault}")
        c = self.cluster
        fresh = not c.exists()
        if fresh:
            log(f"initdb in {c.data}")
            c.init()
        else:
            log(f"reusing the cluster in {c.data}")
        c.start()
        c.sql("ALTER SYSTEM SET archive_command = '/bin/true'")
        c.sql("SELECT pg_reload_conf()")
        # Loaded anew even in a kept cluster: every run starts from the same tables (no dead rows).
        log(f"pgbench -i -s {self.scale} (archiving off while it loads)")
        t0 = time.monotonic()
        self.runner.run([f"{self.bindir}/pgbench", "-h", "127.0.0.1", "-p", str(c.port), "-U", PG_USER,
                         "-i", "-q", "-s", str(self.scale), "postgres"])
        log(f"loaded (and vacuumed) in {time.monotonic() - t0:.0f} s")
        c.sql("CHECKPOINT")
        self.results["database_bytes"] = int(c.one("SELECT pg_database_size('postgres')"))
        self.results["accounts_bytes"] = int(c.one("SELECT pg_total_relation_size('pgbench_accounts')"))
        self.results["settings"] = {r[0]: r[1] for r in c.sql(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'full_page_writes', 'wal_level', "
            "'shared_buffers', 'data_checksums', 'server_version', 'max_wal_size')")}
        self.make_stores()

    def make_stores(self) -> None:
        """A fresh pgvault vault and pgBackRest repository, and the archive_command of each contestant.

        Without pgBackRest among the contestants, no repository, and archive_command
        pushes to pgvault alone, as it would in production.
        """
        c = self.cluster
        for name in ("pgvault", "pgbackrest", "basebackup"):
            shutil.rmtree(self.path(name), ignore_errors=True)
        d = mkdir_pg(self.path("pgvault"))
        self.pgvault_cfg = os.path.join(d, "pgvault.toml")
        self.vault = os.path.join(d, "vault")
        with open(self.pgvault_cfg, "w") as f:
            f.write(f'[vault]\nurl = "file://{self.vault}"\n\n'
                    f'[postgres]\nconninfo = "{c.conninfo}"\ndata_dir = "{c.data}"\n\n'
                    f'[compression]\nalgorithm = "zstd"\nlevel = 3\n\n'
                    f'[archive]\nasync = false\nspool_dir = "{d}/spool"\n\n'
                    f'[backup]\nparallel = 2\n')
        chown_pg(d)
        self.runner.run([self.pgvault, "--config", self.pgvault_cfg, "init"])
        mkdir_pg(self.path("basebackup"))
        alone = ARCHIVE_COMMAND_PGVAULT.format(pgvault=self.pgvault, pgvault_cfg=self.pgvault_cfg)
        if "pgbackrest" in self.contestants:
            names = dict(pgvault=self.pgvault, pgvault_cfg=self.pgvault_cfg,
                         pgbackrest_cfg=self.make_pgbackrest_repo(), stanza=STANZA)
            both = ARCHIVE_COMMAND.format(**names)
            own = {"pgvault": alone, "pgbackrest": ARCHIVE_COMMAND_PGBACKREST.format(**names), "basebackup": both}
        else:
            both = alone
            own = dict.fromkeys(self.contestants, alone)
        self.archive_commands = own if self.args.archive == "own" else dict.fromkeys(self.contestants, both)
        self.archive_command = ""
        self.use_archive_command(both)  # from here on, every segment reaches both stores until a backup
        c.sql("SELECT pg_switch_wal()")
        c.sql("CHECKPOINT")
        c.wait_archived(timeout=120)
        for contestant in self.contestants:
            log(f"archive_command for {contestant}: {self.archive_commands[contestant]}")

    def use_archive_command(self, command: str) -> None:
        """Set archive_command (once the archiver has nothing left for the one before: see measure)."""
        if command == self.archive_command:
            return
        c = self.cluster
        c.wait_archived()
        c.sql(pgsql.SQL("ALTER SYSTEM SET archive_command = {}").format(pgsql.Literal(command)))
        c.sql("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the archiver rereads its settings when signalled; the backup's segments are its next
        self.archive_command = command

    def make_pgbackrest_repo(self) -> str:
        """pgBackRest's repository and stanza; its config file."""
        c = self.cluster
        d = mkdir_pg(self.path("pgbackrest"))
        for sub in ("log", "lock", "spool", "repo"):
            mkdir_pg(os.path.join(d, sub))
        self.repo = os.path.join(d, "repo")
        self.pgbackrest_cfg = os.path.join(d, "pgbackrest.conf")
        lines = ["[global]", f"repo1-path={self.repo}", "repo1-retention-full=99", f"log-path={d}/log",
                 f"lock-path={d}/lock", f"spool-path={d}/spool", "log-level-console=warn", "log-level-stderr=warn",
                 "log-level-file=warn", "compress-type=zst", "compress-level=3", "process-max=2", "start-fast=y",
                 "", f"[{STANZA}]", f"pg1-path={c.data}", f"pg1-port={c.port}", f"pg1-socket-path={self.base}",
                 f"pg1-user={PG_USER}", ""]
        with open(self.pgbackrest_cfg, "w") as f:
            f.write("\n".join(lines))
        os.chmod(self.pgbackrest_cfg, 0o640)
        chown_pg(d)
        self.runner.run(["pgbackrest", f"--config={self.pgbackrest_cfg}", f"--stanza={STANZA}", "stanza-create"])
        return self.pgbackrest_cfg

    # ---- contestants ---------------------------------------------------------------

    def scratch(self) -> str:
        return mkdir_pg(self.path("scratch"))

    def pgvault_backup(self, kind: str) -> Sample:
        run = self.runner.timed([self.pgvault, "--config", self.pgvault_cfg, "backup", "--type", kind, "--json"],
                                scratch=self.scratch())
        result = json.loads(run.stdout)
        if result["type"] != kind:
            raise BenchError(f"pgvault took a {result['type']} backup, not {kind}: {result['notices']}")
        size = dir_bytes(os.path.join(self.vault, "main", "backups", result["label"]))  # [vault] cluster = "main"
        return Sample(run.wall, size, run.maxrss_mb, {
            "label": result["label"], "duration_seconds": result["duration_seconds"],
            "bytes_read": result["bytes_read"], "bytes_stored": result["bytes_stored"],
            "reused_files": result["reused_files"], "objects": result["objects"]})

    def pgbackrest_backup(self, kind: str) -> Sample:
        run = self.runner.timed(["pgbackrest", f"--config={self.pgbackrest_cfg}", f"--stanza={STANZA}",
                                 f"--type={kind}", "backup"], scratch=self.scratch())
        info = json.loads(self.runner.run(["pgbackrest", f"--config={self.pgbackrest_cfg}", f"--stanza={STANZA}",
                                           "--output=json", "info"]).stdout)
        last = info[0]["backup"][-1]
        if last["type"] != kind:
            raise BenchError(f"pgBackRest's newest backup is {last['type']}, not {kind}")
        size = dir_bytes(os.path.join(self.repo, "backup", STANZA, last["label"]))
        return Sample(run.wall, size, run.maxrss_mb, {"label": last["label"],
                                                      "duration_seconds": last["timestamp"]["stop"]
                                                      - last["timestamp"]["start"]})

    def basebackup(self) -> Sample:
        out = os.path.join(self.path("basebackup"), "out")
        shutil.rmtree(out, ignore_errors=True)
        run = self.runner.timed([f"{self.bindir}/pg_basebackup", "-h", "127.0.0.1", "-p", str(self.cluster.port),
                                 "-U", PG_USER, "-D", out, "-Ft", "--compress=server-zstd:workers=2", "-c", "fast"],
                                scratch=self.scratch())
        size = dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return Sample(run.wall, size, run.maxrss_mb)

    def measure(self, contestant: str, name: str, fn) -> None:
        self.use_archive_command(self.archive_commands[contestant])
        self.cluster.wait_archived()
        self.wait_idle()  # also the time (2 s at least) for the archiver to reload its settings
        sample = fn()
        self.samples.setdefault(name, []).append(sample)
        log(f"  {name:16s} {sample.wall:7.2f} s  {sample.size / 2**20:9.1f} MiB  {sample.maxrss_mb:6.0f} MB RSS"
            + (f"  (own duration {sample.detail['duration_seconds']:.2f} s)" if "duration_seconds" in sample.detail
               else ""))

    def wait_idle(self) -> None:
        """Up to --wait-idle seconds for the machine to go quiet (< 15% of the CPUs busy over 2 s)."""
        if self.args.wait_idle <= 0:
            return
        deadline = time.monotonic() + self.args.wait_idle
        busy = machine_busy(2.0)
        while busy >= 0.15 and time.monotonic() < deadline:
            busy = machine_busy(2.0)
        self.results.setdefault("busy_before", []).append(round(busy, 3))
        if busy >= 0.15:
            log(f"  (machine still {busy:.0%} busy: measuring anyway)")

    def update(self) -> None:
        t0 = time.monotonic()
        self.cluster.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s", (self.scale * 1000,))
        self.cluster.sql("CHECKPOINT")
        log(f"  updated 1% of pgbench_accounts (aid <= {self.scale * 1000}) + CHECKPOINT in "
            f"{time.monotonic() - t0:.1f} s")

    def rounds(self) -> None:
        fulls = {"pgvault": ("pgvault full", lambda: self.pgvault_backup("full")),
                 "pgbackrest": ("pgBackRest full", lambda: self.pgbackrest_backup("full")),
                 "basebackup": ("pg_basebackup", self.basebackup)}
        incrs = {"pgvault": ("pgvault incr", lambda: self.pgvault_backup("incr")),
                 "pgbackrest": ("pgBackRest incr", lambda: self.pgbackrest_backup("incr"))}
        for r in range(self.args.rounds):
            log(f"round {r + 1}/{self.args.rounds} (load average {os.getloadavg()[0]:.2f})")
            order = self.contestants[r % len(self.contestants):] + self.contestants[:r % len(self.contestants)]
            for name in order:
                self.measure(name, *fulls[name])
            self.update()
            order = [c for c in order if c in incrs]
            for name in (order if r % 2 == 0 else order[::-1]):
                self.measure(name, *incrs[name])

    def cleanup(self) -> None:
        try:
            self.cluster.stop()
        except Exception as exc:  # noqa: BLE001 - go on cleaning
            log(f"cleanup: stopping the server failed: {exc}")
        for pid in own_processes(self.base):  # anything this run started that outlived the server, by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.args.keep:
            for name in ("pgvault", "pgbackrest", "basebackup", "scratch", "pgvault-venv"):
                shutil.rmtree(self.path(name), ignore_errors=True)
            log(f"kept the cluster in {self.cluster.data} (stopped)")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- report --------------------------------------------------------------------

    def summarize(self) -> dict:
        med = statistics.median
        rows = {}
        for name, samples in self.samples.items():
            rows[name] = {
                "wall_seconds": med(s.wall for s in samples),
                "size_bytes": med(s.size for s in samples),
                "peak_rss_mb": max(s.maxrss_mb for s in samples),
                "samples_seconds": [round(s.wall, 3) for s in samples],
                "samples_bytes": [s.size for s in samples],
            }
            if all("duration_seconds" in s.detail for s in samples):
                rows[name]["own_duration_seconds"] = med(s.detail["duration_seconds"] for s in samples)
            if all("bytes_read" in s.detail for s in samples):
                rows[name]["bytes_read"] = med(s.detail["bytes_read"] for s in samples)
        self.results["medians"] = rows
        ratios, goals = {}, {}
        pv, pb, pvi = rows.get("pgvault full"), rows.get("pgBackRest full"), rows.get("pgvault incr")
        if pv and pb:
            ratios["full_time_vs_pgbackrest"] = pv["wall_seconds"] / pb["wall_seconds"]
            ratios["full_size_vs_pgbackrest"] = pv["size_bytes"] / pb["size_bytes"]
            goals["full_time_vs_pgbackrest"] = ratios["full_time_vs_pgbackrest"] <= GOAL_FULL_VS_PGBACKREST
            goals["full_size_vs_pgbackrest"] = ratios["full_size_vs_pgbackrest"] <= GOAL_SIZE_VS_PGBACKREST
        if pv and rows.get("pg_basebackup"):
            ratios["full_time_vs_basebackup"] = pv["wall_seconds"] / rows["pg_basebackup"]["wall_seconds"]
        if pv and pvi:
            ratios["incr_time_vs_full"] = pvi["wall_seconds"] / pv["wall_seconds"]
            ratios["incr_size_vs_full"] = pvi["size_bytes"] / pv["size_bytes"]
            goals["incr_time_vs_full"] = ratios["incr_time_vs_full"] <= GOAL_INCR_TIME
            goals["incr_size_vs_full"] = ratios["incr_size_vs_full"] <= GOAL_INCR_SIZE
        if rows.get("pgBackRest incr") and pb:
            ratios["pgbackrest_incr_time_vs_full"] = rows["pgBackRest incr"]["wall_seconds"] / pb["wall_seconds"]
            ratios["pgbackrest_incr_size_vs_full"] = rows["pgBackRest incr"]["size_bytes"] / pb["size_bytes"]
        pv_rss = [rows[n]["peak_rss_mb"] for n in ("pgvault full", "pgvault incr") if n in rows]
        if pv_rss:
            ratios["pgvault_peak_rss_mb"] = max(pv_rss)
            goals["pgvault_peak_rss"] = max(pv_rss) <= GOAL_RSS_MB
        self.results["ratios"] = ratios
        self.results["goals"] = goals
        return self.results


def report(r: dict) -> str:
    mib = 2 ** 20
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    lines = [f"pgbench scale {r['scale']}: database {r['database_bytes'] / mib:.0f} MiB "
             f"(pgbench_accounts {r['accounts_bytes'] / mib:.0f} MiB); medians of {r['rounds']} rounds, "
             f"zstd 3, 2 workers each",
             "archive_command: " + ("the timed tool's push alone (--archive own)" if r.get("archive") == "own"
                                    else "both tools' pushes side by side (--archive both)"),
             f"  {'':18s} {'wall s':>8s} {'size MiB':>10s} {'peak RSS MB':>12s}   samples (s)"]
    for name in ("pgvault full", "pgBackRest full", "pg_basebackup", "pgvault incr", "pgBackRest incr"):
        row = r["medians"].get(name)
        if row is None:
            continue
        own = f"   (own duration {row['own_duration_seconds']:.2f} s)" if "own_duration_seconds" in row else ""
        lines.append(f"  {name:18s} {row['wall_seconds']:8.2f} {row['size_bytes'] / mib:10.1f} "
                     f"{row['peak_rss_mb']:12.0f}   {row['samples_seconds']}{own}")
    q, g = r["ratios"], r["goals"]
    lines.append("ratios and goals:")
    if "full_time_vs_pgbackrest" in q:
        lines.append(f"  pgvault full / pgBackRest full, time   {q['full_time_vs_pgbackrest']:6.2f}   "
                     f"goal <= {GOAL_FULL_VS_PGBACKREST:.2f}  {verdict(g['full_time_vs_pgbackrest'])}")
        lines.append(f"  pgvault full / pgBackRest full, size   {q['full_size_vs_pgbackrest']:6.2f}   "
                     f"goal <= {GOAL_SIZE_VS_PGBACKREST:.2f}  {verdict(g['full_size_vs_pgbackrest'])}")
    if "full_time_vs_basebackup" in q:
        lines.append(f"  pgvault full / pg_basebackup, time     {q['full_time_vs_basebackup']:6.2f}   (reference)")
    if "incr_time_vs_full" in q:
        lines.append(f"  pgvault incr / pgvault full, time      {q['incr_time_vs_full']:6.2f}   "
                     f"goal <= {GOAL_INCR_TIME:.2f}  {verdict(g['incr_time_vs_full'])}")
        lines.append(f"  pgvault incr / pgvault full, size      {q['incr_size_vs_full']:6.3f}   "
                     f"goal <= {GOAL_INCR_SIZE:.2f}  {verdict(g['incr_size_vs_full'])}")
    if "pgbackrest_incr_time_vs_full" in q:
        lines.append(f"  pgBackRest incr / its full, time       {q['pgbackrest_incr_time_vs_full']:6.2f}   "
                     f"size {q['pgbackrest_incr_size_vs_full']:.3f}   (reference)")
    if "pgvault_peak_rss_mb" in q:
        lines.append(f"  pgvault peak RSS                       {q['pgvault_peak_rss_mb']:6.0f} MB "
                     f"goal <= {GOAL_RSS_MB}   {verdict(g['pgvault_peak_rss'])}")
    m = r.get("machine", {})
    lines.append(f"machine: {m.get('cpus')} CPUs, load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}; "
                 f"CPU busy before each backup: max {max(r.get('busy_before') or [0]):.0%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, help="pgbench scale (default 100; --quick: 20)")
    parser.add_argument("--quick", action="store_true", help="pgbench scale 20")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contestants", default=",".join(CONTESTANTS),
                        help=f"comma-separated subset of {','.join(CONTESTANTS)} (default: all)")
    parser.add_argument("--pgvault", choices=("regular", "dev"), default="regular",
                        help="regular: a byte-compiled copy of this checkout (default); dev: this venv's pgvault")
    parser.add_argument("--archive", choices=("own", "both"), default="own",
                        help="own: archive_command pushes to the tool being timed alone (default); "
                             "both: to both tools, side by side, for the whole run")
    parser.add_argument("--wait-idle", type=float, default=60, metavar="SECONDS",
                        help="before each backup, wait up to SECONDS for the machine to go quiet (0: never)")
    parser.add_argument("--keep", metavar="DIR", help="build (or reuse) the cluster in DIR and leave it, stopped")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    args = parser.parse_args()
    unknown = set(args.contestants.split(",")) - set(CONTESTANTS)
    if unknown or "pgvault" not in args.contestants.split(","):
        parser.error(f"--contestants: a subset of {','.join(CONTESTANTS)} that includes pgvault")
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL and the tools run as the postgres user")
    need = ["pg_config", "runuser"] + (["pgbackrest"] if "pgbackrest" in args.contestants else [])
    for tool in need:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found in PATH" + (" (apt-get install -y pgbackrest)" if tool == "pgbackrest" else ""))

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    bench = Bench(args)
    bench.results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "pgbackrest": subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.strip()
        if shutil.which("pgbackrest") else None,
    }
    started = time.monotonic()
    code = 0
    try:
        bench.setup()
        bench.rounds()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except BenchError as exc:
        log(f"error: {exc}")
        try:
            with open(bench.cluster.logfile) as f:
                log("server log tail:\n" + f.read()[-3000:])
        except OSError:
            pass
        code = 1
    finally:
        bench.cleanup()
    finish(bench, started=started, code=code, report=report, as_json=args.json)



def finish(bench, *, started: float, code: int, report, as_json: bool) -> None:
    """Print the run's results (text, or JSON with the text on stderr) and exit with ``code``."""
    bench.results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    bench.results["seconds"] = round(time.monotonic() - started, 1)
    if bench.samples and code == 0:
        results = bench.summarize()
        text = report(results)
        if as_json:
            print(text, file=sys.stderr)
            print(json.dumps(results, indent=2, default=str))
        else:
            print(text)
            print(f"(run took {results['seconds']:.0f} s)")
    sys.exit(code)

if __name__ == "__main__":
    main()
