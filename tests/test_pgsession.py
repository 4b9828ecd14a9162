"""The backup's PostgreSQL session in a child process (pgsession): the same answers and errors as in this
process, and no session left behind when either side goes. Each case runs in a fresh interpreter, since
prestart forks, and a fork of the test process (with its threads) is not what the console script does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pgvault.backup.pgsession import LocalSession
from pgvault.errors import PostgresError
from pgvault.restore import pid_alive

pytestmark = pytest.mark.integration

# Ctrl-C as on a terminal, even where the tests were started with SIGINT ignored (a background job
# of a non-interactive shell: Python then keeps it ignored).
PRELUDE = """
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from pgvault.backup.pgsession import open_session, prestart
prestart()
child = __import__("pgvault.backup.pgsession", fromlist=["x"])._prestarted.pid
session = open_session(sys.argv[1])
"""


def run_script(body: str, conninfo: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body), conninfo],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def result_of(body: str, conninfo: str) -> dict:
    out, err = run_script(body, conninfo).communicate(timeout=60)
    assert err == "", err
    return json.loads(out)


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_until_no_pgvault_session(pg_cluster, timeout: float = 30) -> None:
    """The server ends a closed session's backend on its own time: wait for it, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while pg_cluster.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvault'"):
        assert time.monotonic() < deadline, "a pgvault session is still open"
        time.sleep(0.05)


def test_a_child_session_answers_as_one_in_this_process(pg_cluster):
    got = result_of("""
        facts = session.facts()
        port = session.port()
        start_lsn, start_time = session.start("pgsession test")
        stop = session.stop()
        session.close()  # the child closes its connection, exits and is reaped
        try:
            os.kill(child, 0)
            reaped = False
        except ProcessLookupError:
            reaped = True
        print(json.dumps({"kind": type(session).__name__, "facts": facts.__dict__, "port": port,
                          "start_lsn": start_lsn, "start_tz": str(start_time.tzinfo), "stop_lsn": stop.stop_lsn,
                          "label": stop.backup_label, "reaped": reaped}))
        """, pg_cluster.conninfo)
    local = LocalSession.connect(pg_cluster.conninfo)
    try:
        assert got["facts"] == local.facts().__dict__
        assert got["port"] == local.port() == str(pg_cluster.port)
    finally:
        local.close()
    assert got["kind"] == "ChildSession" and got["reaped"]
    assert got["start_tz"] == "UTC" and got["stop_lsn"] >= got["start_lsn"] > 0
    assert "LABEL: pgsession test" in got["label"]
    assert pg_cluster.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvault'") == 0


def test_the_archivers_times_come_back_in_utc_without_the_servers_zone(pg_cluster):
    """In the server's zone, the answer would import zoneinfo in the parent to unpickle (in the WAL wait)."""
    pg_cluster.set(archive_command="/bin/true", timezone="Europe/Paris")
    pg_cluster.reload()
    pg_cluster.sql("SELECT pg_switch_wal() FROM (SELECT txid_current()) AS written")
    deadline = time.monotonic() + 30
    while not pg_cluster.one("SELECT archived_count FROM pg_stat_archiver"):
        assert time.monotonic() < deadline, "the archiver archived nothing"
        time.sleep(0.05)
    got = result_of("""
        status = session.archiver_status()
        print(json.dumps({"archived": str(status.last_archived_time.tzinfo), "wal": status.last_archived_wal,
                          "zoneinfo": "zoneinfo" in sys.modules}))
        session.close()
        """, pg_cluster.conninfo)
    local = LocalSession.connect(pg_cluster.conninfo)
    try:
        here = local.archiver_status()
    finally:
        local.close()
    assert got == {"archived": "UTC", "wal": here.last_archived_wal, "zoneinfo": False}
    assert str(here.last_archived_time.tzinfo) == "UTC"


def test_errors_come_back_as_they_would_be_raised_here(pg_cluster):
    bad = f"host=127.0.0.1 port={pg_cluster.port + 1} dbname=postgres user=postgres connect_timeout=3"
    got = result_of("""
        from pgvault.errors import PostgresError
        try:
            session.facts()  # the connect's answer comes with the first call
        except PostgresError as exc:
            print(json.dumps({"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}))
        """, bad)
    with pytest.raises(PostgresError) as here:
        LocalSession.connect(bad)
    assert got == {"type": "PostgresError", "message": here.value.message, "hint": here.value.hint}

    refused = result_of("""
        from pgvault.errors import PostgresError
        try:
            session.stop()  # no backup running
        except PostgresError as exc:
            print(json.dumps({"message": exc.message, "facts_still": session.facts().wal_level}))
        """, pg_cluster.conninfo)
    assert refused["message"].startswith("PostgreSQL refused the backup: ")
    assert "backup is not in progress" in refused["message"]
    assert refused["facts_still"] == "replica"  # the session goes on after an error


def test_a_child_that_died_is_a_clear_error(pg_cluster):
    got = result_of("""
        from pgvault.errors import PostgresError
        session.facts()
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        try:
            session.port()
        except PostgresError as exc:
            print(json.dumps({"message": exc.message}))
        """, pg_cluster.conninfo)
    assert "the process holding the PostgreSQL session" in got["message"]
    assert "ended unexpectedly; no backup was committed" in got["message"]


def test_the_child_ends_its_session_when_its_parent_dies(pg_cluster):
    proc = run_script("""
        session.start("left running")
        print(child, flush=True)
        time.sleep(120)
        """, pg_cluster.conninfo)
    child = int(proc.stdout.readline())
    assert pg_cluster.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvault'") == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert gone(child)
    wait_until_no_pgvault_session(pg_cluster, timeout=10)
    # The backup ended with the session: a new one starts and stops without complaint.
    local = LocalSession.connect(pg_cluster.conninfo)
    try:
        local.start("after")
        assert "LABEL: after" in local.stop().backup_label
    finally:
        local.close()


def test_ctrl_c_reaches_the_parent_only(pg_cluster):
    proc = run_script("""
        try:
            print(child, flush=True)
            time.sleep(120)
        except KeyboardInterrupt:
            print(session.port(), flush=True)  # the child ignored the same SIGINT and still answers
            session.close()
        """, pg_cluster.conninfo, start_new_session=True)
    child = int(proc.stdout.readline())
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=30)
    assert out.strip() == str(pg_cluster.port), err
    assert gone(child)


def test_closing_while_the_child_runs_a_statement_does_not_wait_for_it(pg_cluster):
    got = result_of("""
        session.facts()
        session._send("_one", "SELECT pg_sleep(5)", None)  # as if Ctrl-C came while a statement ran
        started = time.monotonic()
        session.close()
        print(json.dumps({"seconds": time.monotonic() - started}))
        """, pg_cluster.conninfo)
    assert got["seconds"] < 2  # waiting for the child would take the statement's 5 s
    # The server notices the closed connection when the statement ends (PostgreSQL does not look
    # for it while a query runs unless client_connection_check_interval is set), and ends the session.
    wait_until_no_pgvault_session(pg_cluster, timeout=30)


def test_without_a_child_the_session_is_opened_in_process(pg_cluster):
    script = """
import json, os, sys
from pgvault.backup import pgsession
def no_fork():
    raise BlockingIOError(11, "Resource temporarily unavailable")
os.fork = no_fork
pgsession.prestart()  # a process limit: no child, and no error
session = pgsession.open_session(sys.argv[1])
print(json.dumps({"kind": type(session).__name__, "wal_level": session.facts().wal_level}))
session.close()
"""
    out, err = subprocess.Popen([sys.executable, "-c", script, pg_cluster.conninfo], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True).communicate(timeout=60)
    assert err == "", err
    got = json.loads(out)
    assert got["kind"] == "LocalSession" and got["wal_level"] == "replica"


def test_ending_lets_the_child_go_without_waiting_and_close_still_reaps_it(pg_cluster):
    got = result_of("""
        session.facts()
        started = time.monotonic()
        session.end()
        ended_in = time.monotonic() - started
        deadline = time.monotonic() + 10
        while (reaped := os.waitpid(child, os.WNOHANG)) == (0, 0):  # it exits on its own
            assert time.monotonic() < deadline
            time.sleep(0.01)
        session.close()  # reaped already: nothing to wait for, no error
        print(json.dumps({"ended_in": ended_in, "exit_code": os.waitstatus_to_exitcode(reaped[1])}))
        """, pg_cluster.conninfo)
    assert got["ended_in"] < 1 and got["exit_code"] == 0
    wait_until_no_pgvault_session(pg_cluster, timeout=10)


def test_ending_a_session_in_process_closes_its_connection(pg_cluster):
    local = LocalSession.connect(pg_cluster.conninfo)
    local.facts()
    local.end()
    assert local.conn.closed
    local.close()  # afterwards, as take_backup does: no error



CTRL_C_AT_THE_FORK = """
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from pgvault.backup import pgsession
real_fork = os.fork
def fork_then_ctrl_c():
    pid = real_fork()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the fork, in both processes, before anything else
    return pid
os.fork = fork_then_ctrl_c
interrupted = False
try:
    pgsession.prestart()
    time.sleep(10)
except KeyboardInterrupt:
    interrupted = True
session = pgsession.open_session(sys.argv[1])
print(json.dumps({"pid": os.getpid(), "interrupted": interrupted, "kind": type(session).__name__,
                  "port": session.port()}), flush=True)
session.close()
"""


def test_a_ctrl_c_right_after_the_fork_reaches_the_parent_only(pg_cluster):
    out, err = subprocess.Popen([sys.executable, "-c", CTRL_C_AT_THE_FORK, pg_cluster.conninfo], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True).communicate(timeout=60)
    # One line, from the parent, over its child's session: a child that took the Ctrl-C would
    # run the parent's code on (a second line), a parent that took it too soon would lose its child.
    lines = out.splitlines()
    assert len(lines) == 1, (out, err)
    got = json.loads(lines[0])
    assert got["interrupted"] and got["kind"] == "ChildSession" and got["port"] == str(pg_cluster.port), got
