#!/usr/bin/env python3
"""Benchmark restores: pgvault full and delta restores next to pgBackRest's restore, in one run.

Run as root with the venv's python (it needs psycopg):

    sudo /opt/pgvault-dev/venv/bin/python scripts/bench_restore.py [--scale 100 | --quick] [--json] [--rounds N]

The setup is scripts/bench_backup.py's (imported from it): a throwaway cluster
(initdb as `postgres` in a postgres-owned temporary directory, a free loopback
port), `pgbench -i -s SCALE`, a local pgvault vault and a pgBackRest repository
fed side by side by archive_command, zstd level 3 and 2 workers on both sides.
Then one `pgvault backup --type full` and one `pgbackrest backup --type=full`
(process-max=2), the server is stopped (nothing else runs while restores are
timed), and each round runs, in an order that rotates from round to round:

  pgvault restore      `pgvault restore --to immediate --data-dir DIR --parallel 2 --json`
                       as postgres into an empty postgres-owned directory (not started)
  pgBackRest restore   `pgbackrest --stanza=bench --pg1-path=DIR --process-max=2
                       --type=immediate restore` as postgres into an empty directory
  pgvault delta        `pgvault restore ... --delta` over an intact pgvault-restored
                       directory in which ~1% of the relation files (base/*/<digits>[.N])
                       were damaged just before: bytes flipped in the biggest file (a
                       pgbench_accounts segment) and in a few others, mtime put back
                       (silent corruption); a few files of <= 64 MiB truncated to about
                       half, one deleted; the damaged files are checked afterwards against
                       their checksums from before the damage; the directory's files are in
                       the page cache (read just before, untimed), as on a node that has been
                       running: a delta reads every byte, so only then can it be a fraction of
                       a full restore, which only writes them
  pgvault delta cold   the same, with the directory's pages dropped from the page cache first
                       (posix_fadvise DONTNEED, this directory only), as after a reboot: reported,
                       no goal (pgvault restores with direct I/O, so nothing it writes is cached)

Before each timed restore the page cache is synced (the previous restore's
writeback does not land on the next) and, unless --wait-idle 0, the machine is
quiet. Wall time is from spawning the tool (as postgres) to its exit; CPU time (user +
system) and peak RSS from wait4() (CPU: the tool and the children it waited for;
RSS: the largest of them). Medians of
--rounds. The backups were just written, so the vault and repository are
mostly in the page cache for both tools alike.

Goals (PASS/MISS): pgvault restore <= 0.9 x pgBackRest restore; pgvault delta
(page cache warm) <= 0.20 x pgvault restore; pgvault peak RSS <= 256 MB.

`--profile SECONDS` (0: off) samples one extra, untimed pgvault restore with
py-spy (attached by pid, subprocesses included) and prints where it spent its time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_backup
from bench_backup import STANZA, Sample
from benchlib import PW, BenchError, dir_bytes, log, mkdir_pg

GOAL_RESTORE_VS_PGBACKREST = 0.90
GOAL_DELTA_VS_FULL = 0.20
GOAL_RSS_MB = 256
DAMAGE_SHARE = 0.01
REL_FILE = re.compile(r"^\d+(\.\d+)?$")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def relation_files(data_dir: str) -> list[str]:
    """Main-fork segments of relations under base/ (not _fsm / _vm / _init), sorted."""
    out = []
    base = os.path.join(data_dir, "base")
    for db in sorted(os.listdir(base)):
        d = os.path.join(base, db)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if REL_FILE.match(name) and os.path.isfile(path):
                out.append(path)
    return out


def damage(data_dir: str, seed: int) -> dict:
    """Damage ~1% of the relation files with data: truncate, flip bytes (mtime kept), delete one.

    Returns {path: sha256 before} of the damaged files and a description.
    """
    rng = random.Random(seed)
    every = relation_files(data_dir)
    files = [p for p in every if os.path.getsize(p) >= 8192]
    count = max(3, round(len(every) * DAMAGE_SHARE))
    # Bytes flipped in the biggest file (a pgbench_accounts segment) always: silent corruption where the data
    # is. Truncated and deleted files come from the smaller ones (<= 64 MiB), so that the damage is ~1% of
    # the files, not half the table.
    biggest = max(files, key=os.path.getsize)
    small = [p for p in files if p != biggest and os.path.getsize(p) <= 64 << 20]
    others = rng.sample(small, min(count - 1, len(small)))
    n_trunc = len(others) // 2
    truncated, deleted = others[:n_trunc], others[-1:]
    flipped = [biggest] + others[n_trunc:-1]
    chosen = truncated + flipped + deleted
    before = {p: sha256(p) for p in chosen}
    damaged_bytes = 0
    for p in truncated:
        size = os.path.getsize(p)
        keep = (size // 2) // 8192 * 8192 + rng.randrange(8192)
        os.truncate(p, keep)
        damaged_bytes += size - keep
    for p in flipped:
        st = os.stat(p)
        with open(p, "r+b") as f:
            for _ in range(4):
                off = rng.randrange(st.st_size)
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
                damaged_bytes += 1
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # silent corruption: size and mtime unchanged
    for p in deleted:
        damaged_bytes += os.path.getsize(p)
        os.unlink(p)
    return {"before": before, "truncated": len(truncated), "flipped": len(flipped), "deleted": len(deleted),
            "relation_files": len(relation_files(data_dir)) + len(deleted), "damaged_bytes": damaged_bytes}


def set_page_cache(root: str, *, cached: bool) -> None:
    """Bring every file under ``root`` into the page cache (read it), or drop its pages (after a sync)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if cached:
                    while os.read(fd, 1 << 20):
                        pass
                else:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(runner: bench_backup.Runner, cmd: list[str], *, scratch: str) -> tuple[bench_backup.Run, float]:
    """Runner.timed, plus the CPU seconds (user + system) of the tool and the children it waited for."""
    out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
    with open(out_path, "w+") as out, open(err_path, "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, user=PW.pw_uid, group=PW.pw_gid, extra_groups=[], env=runner.env,
                                cwd=runner.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        run = bench_backup.Run(wall, proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024)
    if run.code != 0:
        raise BenchError(f"{' '.join(cmd)} failed (exit {run.code}):\n{run.stdout}{run.stderr}")
    return run, usage.ru_utime + usage.ru_stime


class RestoreBench(bench_backup.Bench):
    def __init__(self, args) -> None:
        args.contestants = "pgvault,pgbackrest"
        super().__init__(args)
        self.results["contestants"] = ["pgvault restore", "pgBackRest restore", "pgvault delta", "pgvault delta cold"]
        self.parallel = args.parallel

    def setup(self) -> None:
        super().setup()
        c = self.cluster
        log("pgvault full backup")
        pv = self.pgvault_backup("full")
        log(f"  {pv.wall:.1f} s, {pv.size / 2**20:.1f} MiB, label {pv.detail['label']}")
        log("pgBackRest full backup")
        pb = self.pgbackrest_backup("full")
        log(f"  {pb.wall:.1f} s, {pb.size / 2**20:.1f} MiB, label {pb.detail['label']}")
        self.results["backups"] = {"pgvault": {"wall_seconds": pv.wall, "size_bytes": pv.size, **pv.detail},
                                   "pgbackrest": {"wall_seconds": pb.wall, "size_bytes": pb.size, **pb.detail}}
        self.results["data_dir_bytes"] = dir_bytes(c.data)
        c.wait_archived()
        c.stop()  # restores need no server: keep the machine quiet
        mkdir_pg(self.path("restore"), 0o755)
        self.delta_dir = self.path("restore", "delta")
        log("an intact pgvault-restored directory for the delta runs (untimed)")
        self.runner.run(self.pgvault_restore_cmd(self.delta_dir))

    # ---- contestants ---------------------------------------------------------------

    def pgvault_restore_cmd(self, data_dir: str, *, delta: bool = False) -> list[str]:
        return [self.pgvault, "--config", self.pgvault_cfg, "restore", "--to", "immediate", "--data-dir", data_dir,
                "--parallel", str(self.parallel), "--json"] + (["--delta"] if delta else [])

    def empty_dir(self, name: str) -> str:
        path = self.path("restore", name)
        shutil.rmtree(path, ignore_errors=True)
        return mkdir_pg(path, 0o700)

    def pgvault_restore(self) -> Sample:
        target = self.empty_dir("pgvault")
        run, cpu = timed(self.runner, self.pgvault_restore_cmd(target), scratch=self.scratch())
        result = json.loads(run.stdout)
        size = dir_bytes(target)
        shutil.rmtree(target, ignore_errors=True)
        return Sample(run.wall, size, run.maxrss_mb, {
            "cpu_seconds": cpu, "duration_seconds": result["seconds"],
            "materialize_seconds": result["materialize_seconds"], "files": result["files"], "bytes": result["bytes"], "objects_read": result["objects_read"]})

    def pgbackrest_restore(self) -> Sample:
        target = self.empty_dir("pgbackrest")
        run, cpu = timed(self.runner, ["pgbackrest", f"--config={self.pgbackrest_cfg}", f"--stanza={STANZA}",
                                 f"--pg1-path={target}", f"--process-max={self.parallel}", "--type=immediate",
                                 "restore"], scratch=self.scratch())
        size = dir_bytes(target)
        shutil.rmtree(target, ignore_errors=True)
        return Sample(run.wall, size, run.maxrss_mb, {"cpu_seconds": cpu})

    def pgvault_delta(self, *, cached: bool = True) -> Sample:
        n = len(self.samples.get("pgvault delta", [])) + len(self.samples.get("pgvault delta cold", []))
        hurt = damage(self.delta_dir, seed=n)
        set_page_cache(self.delta_dir, cached=cached)
        run, cpu = timed(self.runner, self.pgvault_restore_cmd(self.delta_dir, delta=True), scratch=self.scratch())
        result = json.loads(run.stdout)
        wrong = [p for p, h in hurt["before"].items() if not os.path.exists(p) or sha256(p) != h]
        if wrong:
            raise BenchError(f"--delta left {len(wrong)} damaged file(s) as they were, e.g. {wrong[0]}")
        return Sample(run.wall, result["bytes"], run.maxrss_mb, {
            "cpu_seconds": cpu, "duration_seconds": result["seconds"], "materialize_seconds": result["materialize_seconds"],
            "files_fetched": result["files_fetched"], "files_kept": result["files_kept"],
            "bytes_fetched": result["bytes_fetched"], "bytes_checked": result["bytes_checked"],
            "damaged": {k: v for k, v in hurt.items() if k != "before"}})

    def measure(self, name: str, fn) -> None:
        os.sync()  # the previous contestant's dirty pages are not this one's writeback
        self.wait_idle()
        sample = fn()
        self.samples.setdefault(name, []).append(sample)
        extra = f"  {sample.detail['cpu_seconds']:5.2f} s CPU"
        if "duration_seconds" in sample.detail:
            extra += f"  (own {sample.detail['duration_seconds']:.2f} s)"
        if "bytes_fetched" in sample.detail:
            d = sample.detail
            extra += (f"  fetched {d['files_fetched']} files / {d['bytes_fetched'] / 2**20:.1f} MiB, "
                      f"kept {d['files_kept']}, damaged {d['damaged']}")
        log(f"  {name:18s} {sample.wall:7.2f} s  {sample.maxrss_mb:6.0f} MB RSS{extra}")

    def rounds(self) -> None:
        contestants = [("pgvault restore", self.pgvault_restore), ("pgBackRest restore", self.pgbackrest_restore),
                       ("pgvault delta", self.pgvault_delta),
                       ("pgvault delta cold", lambda: self.pgvault_delta(cached=False))]
        for r in range(self.args.rounds):
            log(f"round {r + 1}/{self.args.rounds} (load average {os.getloadavg()[0]:.2f})")
            k = r % len(contestants)
            for name, fn in contestants[k:] + contestants[:k]:
                self.measure(name, fn)
        if self.args.profile > 0:
            self.profile()

    def profile(self) -> None:
        """One more pgvault restore (untimed) under py-spy; top frames by own and inclusive samples."""
        os.sync()
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(pyspy):
            log("py-spy not found: no profile")
            return
        target = self.empty_dir("pgvault")
        raw = os.path.join(self.scratch(), "profile.txt")
        with open(os.devnull, "w") as null:
            proc = subprocess.Popen(self.pgvault_restore_cmd(target), user=PW.pw_uid, group=PW.pw_gid,
                                    extra_groups=[], env=self.runner.env, cwd=self.runner.cwd,
                                    stdin=subprocess.DEVNULL, stdout=null, stderr=null)
            spy = subprocess.run([pyspy, "record", "--pid", str(proc.pid), "--subprocesses", "--format", "raw",
                                  "--rate", "200", "--duration", str(max(1, int(self.args.profile))), "--nonblocking",
                                  "--output", raw], capture_output=True, text=True, check=False)
            proc.wait()
        shutil.rmtree(target, ignore_errors=True)
        if not os.path.exists(raw):
            log(f"py-spy failed: {spy.stderr[-500:]}")
            return
        own, incl, total = Counter(), Counter(), 0
        with open(raw) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = [re.sub(r" \(/.*?([^/]+\.py):\d+\)", r" (\1)", fr) for fr in stack.split(";")]
                frames = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
                total += n
                if frames:
                    own[frames[-1]] += n
                for fr in set(frames):
                    incl[fr] += n
        self.results["profile"] = {"samples": total, "own": own.most_common(15), "inclusive": incl.most_common(25)}

    # ---- report --------------------------------------------------------------------

    def summarize(self) -> dict:
        med = statistics.median
        rows = {}
        for name, samples in self.samples.items():
            rows[name] = {"wall_seconds": med(s.wall for s in samples),
                          "peak_rss_mb": max(s.maxrss_mb for s in samples),
                          "size_bytes": med(s.size for s in samples),
                          "samples_seconds": [round(s.wall, 3) for s in samples]}
            if all("duration_seconds" in s.detail for s in samples):
                rows[name]["own_duration_seconds"] = med(s.detail["duration_seconds"] for s in samples)
            rows[name]["cpu_seconds"] = med(s.detail["cpu_seconds"] for s in samples)
            if name.startswith("pgvault delta"):
                rows[name]["details"] = [s.detail for s in samples]
        self.results["medians"] = rows
        ratios, goals = {}, {}
        pv, pb, pd = rows.get("pgvault restore"), rows.get("pgBackRest restore"), rows.get("pgvault delta")
        pc = rows.get("pgvault delta cold")
        if pv and pb:
            ratios["restore_time_vs_pgbackrest"] = pv["wall_seconds"] / pb["wall_seconds"]
            goals["restore_time_vs_pgbackrest"] = ratios["restore_time_vs_pgbackrest"] <= GOAL_RESTORE_VS_PGBACKREST
        if pv and pd:
            ratios["delta_time_vs_full"] = pd["wall_seconds"] / pv["wall_seconds"]
            goals["delta_time_vs_full"] = ratios["delta_time_vs_full"] <= GOAL_DELTA_VS_FULL
        if pv and pc:
            ratios["delta_cold_time_vs_full"] = pc["wall_seconds"] / pv["wall_seconds"]  # reported, no goal
        rss = [rows[n]["peak_rss_mb"] for n in ("pgvault restore", "pgvault delta", "pgvault delta cold") if n in rows]
        if rss:
            ratios["pgvault_peak_rss_mb"] = max(rss)
            goals["pgvault_peak_rss"] = max(rss) <= GOAL_RSS_MB
        self.results["ratios"], self.results["goals"] = ratios, goals
        return self.results


def report(r: dict) -> str:
    mib = 2 ** 20
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    b = r["backups"]
    lines = [(f"pgbench scale {r['scale']}: database {r['database_bytes'] / mib:.0f} MiB, data directory "
              f"{r['data_dir_bytes'] / mib:.0f} MiB; backups: pgvault {b['pgvault']['size_bytes'] / mib:.0f} MiB, "
              f"pgBackRest {b['pgbackrest']['size_bytes'] / mib:.0f} MiB (zstd 3); medians of {r['rounds']} rounds, "
              f"2 workers each"),
             f"  {'':20s} {'wall s':>8s} {'CPU s':>7s} {'peak RSS MB':>12s}   samples (s)"]
    for name in ("pgvault restore", "pgBackRest restore", "pgvault delta", "pgvault delta cold"):
        row = r["medians"].get(name)
        if row is None:
            continue
        own = f"   (own duration {row['own_duration_seconds']:.2f} s)" if "own_duration_seconds" in row else ""
        lines.append(f"  {name:20s} {row['wall_seconds']:8.2f} {row['cpu_seconds']:7.2f} {row['peak_rss_mb']:12.0f}   "
                     f"{row['samples_seconds']}{own}")
    d = (r["medians"].get("pgvault delta") or {}).get("details")
    if d:
        x = d[0]
        lines.append(f"  delta damage: {x['damaged']['truncated']} truncated, {x['damaged']['flipped']} flipped, "
                     f"{x['damaged']['deleted']} deleted of {x['damaged']['relation_files']} relation files; "
                     f"pgvault fetched {x['files_fetched']} files / {x['bytes_fetched'] / mib:.1f} MiB, "
                     f"re-hashed {x['bytes_checked'] / mib:.0f} MiB")
    q, g = r["ratios"], r["goals"]
    lines.append("ratios and goals:")
    if "restore_time_vs_pgbackrest" in q:
        lines.append(f"  pgvault restore / pgBackRest restore   {q['restore_time_vs_pgbackrest']:6.2f}   "
                     f"goal <= {GOAL_RESTORE_VS_PGBACKREST:.2f}  {verdict(g['restore_time_vs_pgbackrest'])}")
    if "delta_time_vs_full" in q:
        lines.append(f"  pgvault delta / pgvault restore        {q['delta_time_vs_full']:6.2f}   "
                     f"goal <= {GOAL_DELTA_VS_FULL:.2f}  {verdict(g['delta_time_vs_full'])}  (page cache warm)")
    if "delta_cold_time_vs_full" in q:
        lines.append(f"  pgvault delta cold / pgvault restore   {q['delta_cold_time_vs_full']:6.2f}   "
                     f"(no goal: every byte read from the disk)")
    if "pgvault_peak_rss_mb" in q:
        lines.append(f"  pgvault peak RSS                       {q['pgvault_peak_rss_mb']:6.0f} MB "
                     f"goal <= {GOAL_RSS_MB}   {verdict(g['pgvault_peak_rss'])}")
    m = r.get("machine", {})
    lines.append(f"machine: {m.get('cpus')} CPUs, load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}; "
                 f"CPU busy before each restore: max {max(r.get('busy_before') or [0]):.0%}")
    p = r.get("profile")
    if p:
        lines.append(f"py-spy profile of one pgvault restore ({p['samples']} samples, all threads and processes):")
        lines.append("  own (leaf frame):")
        lines += [f"    {n / max(1, p['samples']):6.1%}  {fr}" for fr, n in p["own"]]
        lines.append("  inclusive:")
        lines += [f"    {n / max(1, p['samples']):6.1%}  {fr}" for fr, n in p["inclusive"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, help="pgbench scale (default 100; --quick: 20)")
    parser.add_argument("--quick", action="store_true", help="pgbench scale 20")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="pgvault --parallel and pgBackRest --process-max")
    parser.add_argument("--pgvault", choices=("regular", "dev"), default="regular",
                        help="regular: a byte-compiled copy of this checkout (default); dev: this venv's pgvault")
    parser.add_argument("--wait-idle", type=float, default=60, metavar="SECONDS",
                        help="before each restore, wait up to SECONDS for the machine to go quiet (0: never)")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="sample one extra pgvault restore with py-spy for up to SECONDS (0: off)")
    parser.add_argument("--keep", metavar="DIR", help="build (or reuse) the cluster in DIR and leave it, stopped")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL and the tools run as the postgres user")
    for tool in ("pg_config", "runuser", "pgbackrest"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found in PATH" + (" (apt-get install -y pgbackrest)" if tool == "pgbackrest" else ""))

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    bench = RestoreBench(args)
    bench.results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "pgbackrest": subprocess.run(["pgbackrest", "version"], capture_output=True, text=True, check=False).stdout.strip(),
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
        code = 1
    finally:
        if args.keep:
            shutil.rmtree(bench.path("restore"), ignore_errors=True)
        bench.cleanup()
    bench_backup.finish(bench, started=started, code=code, report=report, as_json=args.json)


if __name__ == "__main__":
    main()
