#!/usr/bin/env python3
"""Benchmark the object codec against `zstd -3 -T2` on real PostgreSQL relation files.

Run as root: a throwaway cluster is created as the `postgres` OS user in a
temporary directory (initdb, a free loopback port, `pgbench -i -s SCALE`), then
stopped; the relation files under base/ are concatenated into one corpus file
that every contestant reads, warm in the page cache. Each round runs, in turn:

    zstd      `zstd -q -3 -T2 -c CORPUS > /dev/null`
    encode    pgvault codec, zstd level 3, 2 threads, AES-256-GCM, output to /dev/null
    decode    pgvault codec, decrypt + decompress + verify sha256, output to /dev/null

pgvault runs in a child process; its peak RSS comes from wait4() on that child,
its throughput from the time the child spends encoding or decoding (interpreter
start-up is reported apart). Medians of --rounds rounds are printed.

Goals: encode >= 70% of zstd's MB/s, decode faster than encode, peak RSS < 200 MB.

    sudo python scripts/bench_codec.py [--scale 70] [--keep DIR] [--rounds 3] [--json]

--keep DIR builds the cluster in DIR (or reuses the one already there) and
leaves it; without it everything the run created is removed. The script only
ever stops the server it started itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PG_USER = "postgres"
OBJECT_NAME = "bench/corpus"
GOAL_RATIO, GOAL_RSS_MB = 0.70, 200


# -- the throwaway cluster ---------------------------------------------------------


def pg_bindir() -> str:
    return subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True).stdout.strip()


def as_pg_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as another user, run as ourselves.
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_cluster(workdir: str, scale: int) -> str:
    """initdb + pgbench -i in ``workdir``/data unless already there; returns the data dir."""
    data = os.path.join(workdir, "data")
    if os.path.exists(os.path.join(data, "PG_VERSION")):
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            sys.exit(f"a server seems to be running in {data}; stop it first (this script only stops its own)")
        log(f"reusing the cluster in {data}")
        return data
    bindir = pg_bindir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(workdir, pw.pw_uid, pw.pw_gid)

    def run(cmd: list[str]) -> None:
        done = subprocess.run(as_pg_user(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout}")

    port = free_port()
    log(f"initdb + pgbench -i -s {scale} in {data} (port {port})")
    run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", PG_USER, "--no-sync"])
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_wal_size=4GB"
    run([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(workdir, "server.log"), "-w", "start"])
    try:
        run([f"{bindir}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-i", "-q", "-s", str(scale), "postgres"])
    finally:
        # Our own server, by its data directory: never any other cluster.
        run([f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"])
    return data


def build_corpus(data: str, path: str) -> tuple[int, int]:
    """Concatenate the relation files under base/ into ``path``; returns (files, bytes)."""
    files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(os.path.join(data, "base")) for name in names
    )
    with open(path, "wb") as out:
        for name in files:
            with open(name, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return len(files), os.path.getsize(path)


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 22):
            pass


# -- contestants --------------------------------------------------------------------


def time_zstd(corpus: str) -> float:
    with open(os.devnull, "wb") as null:
        start = time.perf_counter()
        subprocess.run(["zstd", "-q", "-3", "-T2", "-c", corpus], check=True, stdout=null)
        return time.perf_counter() - start


def run_child(args: list[str], secret_hex: str) -> dict:
    """Run this script in --child mode; returns its report plus wall time and peak RSS (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    proc.stdin.write(secret_hex.encode() + b"\n")  # the key goes by pipe, never in argv
    proc.stdin.close()
    out = proc.stdout.read()
    # wait4 gives this child's own peak RSS; getrusage(RUSAGE_CHILDREN) would
    # report the largest of all children so far, zstd's runs included.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    report = json.loads(out)
    report["wall_seconds"] = wall
    report["maxrss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return report


def child(mode: str, source: str, target: str, expected: str | None) -> None:
    """Encode or decode ``source`` into ``target``; prints a JSON report."""
    from pgvault import codec
    from pgvault.keys import Keyring, VaultKey

    key = VaultKey(key_id="bench000bench000", secret=bytes.fromhex(sys.stdin.readline().strip()))
    start = time.perf_counter()
    with open(source, "rb", buffering=0) as src, open(target, "wb") as dst:
        if mode == "encode":
            reader = codec.encode(src, name=OBJECT_NAME, level=3, threads=2, key=key)
        else:
            reader = codec.decode(src, name=OBJECT_NAME, keyring=Keyring([key]), expected_sha256=expected)
        written = 0
        while block := reader.read(1 << 20):
            dst.write(block)
            written += len(block)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "written": written, "sha256": reader.plaintext_sha256,
                      "plaintext": reader.plaintext_size}))


# -- main --------------------------------------------------------------------------


def bench(corpus: str, scratch: str, rounds: int) -> dict:
    size = os.path.getsize(corpus)
    secret = os.urandom(32).hex()
    obj = os.path.join(scratch, "corpus.pgv")
    zst = os.path.join(scratch, "corpus.zst")
    warm(corpus)
    # Untimed: the encoded object (decode's input) and both compressed sizes.
    first = run_child(["encode", corpus, obj], secret)
    with open(zst, "wb") as out:
        subprocess.run(["zstd", "-q", "-3", "-T2", "-c", corpus], check=True, stdout=out)
    warm(obj)
    samples: dict[str, list] = {"zstd": [], "encode": [], "decode": []}
    for i in range(rounds):
        samples["zstd"].append(time_zstd(corpus))
        samples["encode"].append(run_child(["encode", corpus, os.devnull], secret))
        samples["decode"].append(run_child(["decode", obj, os.devnull, first["sha256"]], secret))
        log(f"round {i + 1}/{rounds}: zstd {size / samples['zstd'][-1] / 1e6:.0f} MB/s, "
            f"encode {size / samples['encode'][-1]['seconds'] / 1e6:.0f} MB/s, "
            f"decode {size / samples['decode'][-1]['seconds'] / 1e6:.0f} MB/s")
    for report in samples["decode"]:
        assert report["written"] == size and report["sha256"] == first["sha256"]

    mbps = lambda seconds: size / seconds / 1e6  # noqa: E731
    med = statistics.median
    zstd_mbps = med(mbps(s) for s in samples["zstd"])
    enc_mbps = med(mbps(r["seconds"]) for r in samples["encode"])
    dec_mbps = med(mbps(r["seconds"]) for r in samples["decode"])
    enc_rss = max(r["maxrss_mb"] for r in samples["encode"])
    dec_rss = max(r["maxrss_mb"] for r in samples["decode"])
    return {
        "corpus_bytes": size,
        "rounds": rounds,
        "zstd_mbps": zstd_mbps,
        "encode_mbps": enc_mbps,
        "decode_mbps": dec_mbps,
        "encode_mbps_with_startup": med(mbps(r["wall_seconds"]) for r in samples["encode"]),
        "decode_mbps_with_startup": med(mbps(r["wall_seconds"]) for r in samples["decode"]),
        "encode_vs_zstd": enc_mbps / zstd_mbps,
        "decode_vs_encode": dec_mbps / enc_mbps,
        "zstd_compressed_bytes": os.path.getsize(zst),
        "pgvault_object_bytes": os.path.getsize(obj),
        "encode_peak_rss_mb": enc_rss,
        "decode_peak_rss_mb": dec_rss,
        "samples_mbps": {
            "zstd": [round(mbps(s)) for s in samples["zstd"]],
            "encode": [round(mbps(r["seconds"])) for r in samples["encode"]],
            "decode": [round(mbps(r["seconds"])) for r in samples["decode"]],
        },
        "goals": {
            "encode_ge_70pct_of_zstd": enc_mbps >= GOAL_RATIO * zstd_mbps,
            "decode_faster_than_encode": dec_mbps > enc_mbps,
            "peak_rss_below_200mb": max(enc_rss, dec_rss) < GOAL_RSS_MB,
        },
    }


def print_report(r: dict, files: int) -> None:
    ok = lambda b: "ok" if b else "MISSED"  # noqa: E731
    g = r["goals"]
    print(f"corpus: {files} relation files, {r['corpus_bytes'] / 2**20:.0f} MiB; medians of {r['rounds']} rounds")
    print(f"  zstd -3 -T2          {r['zstd_mbps']:7.0f} MB/s   {r['zstd_compressed_bytes'] / 2**20:8.1f} MiB out   {r['samples_mbps']['zstd']}")
    print(f"  pgvault encode       {r['encode_mbps']:7.0f} MB/s   {r['pgvault_object_bytes'] / 2**20:8.1f} MiB out   {r['samples_mbps']['encode']}"
          f"   ({r['encode_mbps_with_startup']:.0f} MB/s incl. interpreter start)")
    print(f"  pgvault decode       {r['decode_mbps']:7.0f} MB/s                       {r['samples_mbps']['decode']}"
          f"   ({r['decode_mbps_with_startup']:.0f} MB/s incl. interpreter start)")
    print(f"  encode / zstd        {r['encode_vs_zstd']:7.2f}     goal >= {GOAL_RATIO:.2f}: {ok(g['encode_ge_70pct_of_zstd'])}")
    print(f"  decode / encode      {r['decode_vs_encode']:7.2f}     goal > 1: {ok(g['decode_faster_than_encode'])}")
    print(f"  peak RSS encode      {r['encode_peak_rss_mb']:7.0f} MB   decode {r['decode_peak_rss_mb']:.0f} MB   "
          f"goal < {GOAL_RSS_MB} MB: {ok(g['peak_rss_below_200mb'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=70, help="pgbench scale (70 gives ~1 GiB of relation files)")
    parser.add_argument("--keep", metavar="DIR", help="build (or reuse) the cluster in DIR and keep it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, source, target, *expected = args.child
        return child(mode, source, target, expected[0] if expected else None)

    for tool in ("zstd", "pg_config", "runuser"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found in PATH")
    scratch = tempfile.mkdtemp(prefix="pgvault-bench-")
    workdir = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="pgvault-bench-pg-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        data = build_cluster(workdir, args.scale)
        corpus = os.path.join(scratch, "corpus")
        files, _ = build_corpus(data, corpus)
        result = bench(corpus, scratch, args.rounds)
        result["relation_files"] = files
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_report(result, files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
