"""The backup's PostgreSQL session: the one connection a non-exclusive backup lives in.

``LocalSession`` runs the backup's statements over psycopg in this process.
``pgvault backup`` starts its session in a child process instead, first thing
(``prestart``, from the console script, before click and the rest are
imported): importing psycopg (~75-80 ms) and connecting then happen on another
CPU while this process imports the rest, takes the backup lock and fetches the
parent's file list, and pg_backup_start goes out sooner (~20-25 ms, measured
on a 0.35 s incremental when this process was introduced).
``ChildSession`` forwards each call to that child over two pipes, where a
``LocalSession`` answers it; errors come back as the same PgvaultError.

The child holds the connection. It ignores SIGINT (the parent handles Ctrl-C
and cleans up) and ends when its pipe from the parent closes: when the parent closes
the session, or dies, which ends the session on the server and so aborts a
backup still running, as a closed connection always has.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself is not imported here: see below
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Any, NoReturn

    from pgvault import pg

# Nothing else at module level: ``prestart`` runs before the fork, where every import delays the
# parent (pickle and the pg module cost ~12 ms). The rest is imported where it is used, after it.


class StopResult:
    """What pg_backup_stop returns."""

    __slots__ = ("stop_lsn", "stop_time", "backup_label", "tablespace_map")

    def __init__(self, stop_lsn: int, stop_time: datetime, backup_label: str, tablespace_map: str | None) -> None:
        self.stop_lsn, self.stop_time = stop_lsn, stop_time
        self.backup_label, self.tablespace_map = backup_label, tablespace_map


class LocalSession:
    """pg_backup_start / pg_backup_stop (pg_start_backup / pg_stop_backup before 15) and the checks' queries."""

    def __init__(self, conn: Any, conninfo: str) -> None:
        self.conn = conn
        self.conninfo = conninfo
        self._facts: pg.ServerFacts | None = None

    @classmethod
    def connect(cls, conninfo: str) -> LocalSession:
        from pgvault import pg

        conn = pg.connect(conninfo)
        try:
            with conn.cursor() as cur:
                # The session sits idle while files are copied: no timeout may end it.
                cur.execute("SET statement_timeout = 0")
                if conn.info.server_version >= 140000:
                    cur.execute("SET idle_session_timeout = 0")
        except BaseException:
            conn.close()
            raise
        return cls(conn, conninfo)

    def describe(self) -> str:
        """Where the server is, for messages (no password)."""
        from pgvault import pg

        return pg.describe_conninfo(self.conninfo)

    def facts(self) -> pg.ServerFacts:
        from pgvault import pg

        if self._facts is None:
            self._facts = pg.server_facts(self.conn)
        return self._facts

    def port(self) -> str:
        return str(self._one("SELECT current_setting('port')", None)[0])

    def start(self, label: str) -> tuple[int, datetime]:
        """Start the backup with an immediate checkpoint: (start LSN, server time)."""
        from pgvault.wal import parse_lsn

        sql = ("SELECT pg_backup_start(%s, true)::text, clock_timestamp()" if self.facts().major_version >= 15
               else "SELECT pg_start_backup(%s, true, false)::text, clock_timestamp()")
        row = self._one(sql, (label,))
        return parse_lsn(row[0]), _utc(row[1])

    def stop(self) -> StopResult:
        """Stop the backup without waiting for archiving (the caller waits for the WAL in the vault)."""
        from pgvault.wal import parse_lsn

        sql = ("SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_backup_stop(false)"
               if self.facts().major_version >= 15 else
               "SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_stop_backup(false, false)")
        row = self._one(sql, None)
        return StopResult(parse_lsn(row[0]), _utc(row[3]), row[1], row[2] or None)

    def archiver_status(self) -> pg.ArchiverStatus | None:
        """pg_stat_archiver (its times in UTC, as start's and stop's), or None if the server would not say.

        In UTC, a child's answer unpickles without zoneinfo, which the session's
        time zone would import in the parent (4-10 ms measured, in the WAL wait).
        """
        from dataclasses import replace

        import psycopg

        from pgvault import pg

        try:
            status = pg.archiver_status(self.conn)
        except psycopg.Error:
            return None
        archived, failed = status.last_archived_time, status.last_failed_time
        return replace(status, last_archived_time=archived and _utc(archived), last_failed_time=failed and _utc(failed))

    def end(self) -> None:
        """The backup needs the session no more: close it (``close`` does nothing more here)."""
        self.conn.close()

    def close(self) -> None:
        self.conn.close()

    def _one(self, sql: str, params) -> tuple:
        import psycopg

        from pgvault.errors import PostgresError

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone()
        except psycopg.Error as exc:
            raise PostgresError(f"PostgreSQL refused the backup: {' '.join(str(exc).split())}") from None


def _utc(value: datetime) -> datetime:
    from datetime import timezone

    return value.astimezone(timezone.utc)


def _answered_error(kind: str, message: str, hint: str | None) -> Exception:
    """The error a child answered with, as raised here: a PostgresError unless it was a BackupError."""
    from pgvault.backup.errors import BackupError
    from pgvault.errors import PostgresError

    return (BackupError if kind == "BackupError" else PostgresError)(message, hint=hint)


class ChildSession:
    """A LocalSession in a child process (see the module docstring); the same methods."""

    def __init__(self, pid: int, requests: int, answers: int) -> None:
        self.pid = pid
        self._requests = os.fdopen(requests, "wb")
        self._answers = os.fdopen(answers, "rb")
        self._unanswered = 0  # requests sent whose answers are still to be read
        self.conninfo = ""

    def connect(self, conninfo: str) -> None:
        """Have the child connect; its answer (an error, if it could not) is read at the next call."""
        self.conninfo = conninfo
        self._send("connect", conninfo)

    def describe(self) -> str:
        return self._call("describe")

    def facts(self) -> pg.ServerFacts:
        return self._call("facts")

    def port(self) -> str:
        return self._call("port")

    def start(self, label: str) -> tuple[int, datetime]:
        return self._call("start", label)

    def stop(self) -> StopResult:
        return self._call("stop")

    def archiver_status(self) -> pg.ArchiverStatus | None:
        return self._call("archiver_status")

    def end(self) -> None:
        """Let the child close the connection and exit, without waiting for it; ``close`` reaps it.

        Called once the backup needs the session no more (its WAL is archived):
        the child's exit (~5 ms measured) then overlaps the manifest's write
        instead of adding to it.
        """
        if not self._unanswered:
            self._requests.close()  # the child reads the end of its requests

    def close(self) -> None:
        """End the session (the child closes the connection and exits) and reap the child."""
        if self._answers.closed:
            return
        if self._unanswered:  # interrupted (Ctrl-C) while the child runs a statement: not worth waiting for
            import signal

            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._requests.close()
        self._answers.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def _call(self, method: str, *args):
        """Send a call; read its answer and any still due before it (the connect's). The first error wins."""
        self._send(method, *args)
        error: Exception | None = None
        result = None
        while self._unanswered:
            reply = self._receive()
            if reply[0] == "ok":
                result = reply[1]
            elif error is None:
                error = _answered_error(*reply[1:])
        if error is not None:
            raise error
        return result

    def _send(self, method: str, *args) -> None:
        import pickle

        try:
            pickle.dump((method, args), self._requests)
            self._requests.flush()
        except OSError:
            raise self._gone() from None
        self._unanswered += 1

    def _receive(self) -> tuple:
        import pickle

        try:
            reply = pickle.load(self._answers)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._gone() from None
        self._unanswered -= 1
        return reply

    def _gone(self) -> Exception:
        from pgvault.errors import PostgresError

        self._unanswered = 0
        return PostgresError(f"the process holding the PostgreSQL session (pid {self.pid}) ended unexpectedly; "
                             "no backup was committed")


_prestarted: ChildSession | None = None


def prestart() -> None:
    """Start the session's child process now, before this process imports anything else; see open_session.

    Only while this process has no other threads: a fork copies the calling thread alone.
    If no process can be started (a process limit, no memory), the session is
    opened in this process later, as for library callers.
    """
    global _prestarted
    import signal  # the child needs it first thing: imported before the fork, it has it already

    fds = [*os.pipe(), *os.pipe()]
    requests_read, requests_write, answers_read, answers_write = fds
    # Ctrl-C is held back across the fork: one that came before the child ignores SIGINT would
    # raise KeyboardInterrupt in the child, which would then run this process's code on. The
    # parent gets it once it knows its child; the child's copy of the mask holds it until ignored (discarded).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in fds:
            os.close(fd)
        return
    if pid == 0:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(requests_write)
            os.close(answers_read)
            _serve(requests_read, answers_write)
        finally:
            os._exit(1)  # never back into the parent's code (_serve itself ends with os._exit(0))
    os.close(requests_read)
    os.close(answers_write)
    _prestarted = ChildSession(pid, requests_write, answers_read)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held back is raised here, the child known


def open_session(conninfo: str) -> LocalSession | ChildSession:
    """The session to take a backup in: the prestarted child's, if there is one (once), else one in this process.

    A child's connection attempt is answered at the session's first call, so
    the caller can go on meanwhile.
    """
    global _prestarted
    child, _prestarted = _prestarted, None
    if child is None:
        return LocalSession.connect(conninfo)
    child.connect(conninfo)
    return child


def _serve(requests_fd: int, answers_fd: int) -> NoReturn:
    """The child (SIGINT ignored): answer the parent's calls with a LocalSession until the parent closes its end."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    session: LocalSession | None = None
    try:
        import gc
        import pickle

        # The backup waits for this import (~80 ms): the collector's passes over the thousands of objects
        # it creates are ~7 ms of it (measured), and none of them is garbage. Frozen, they are never scanned again.
        gc.disable()
        import psycopg  # noqa: F401 - now, while the parent imports the rest: the point of this process

        from pgvault.errors import PgvaultError, PostgresError

        gc.freeze()
        gc.enable()

        requests = os.fdopen(requests_fd, "rb")
        answers = os.fdopen(answers_fd, "wb")
        while True:
            try:
                method, args = pickle.load(requests)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            try:
                if method == "connect":
                    session = LocalSession.connect(*args)
                    reply = ("ok", None)
                elif session is None:
                    raise PostgresError("not connected to PostgreSQL")
                else:
                    reply = ("ok", getattr(session, method)(*args))
            except PgvaultError as exc:
                reply = ("error", type(exc).__name__, exc.message, exc.hint)
            except Exception as exc:  # noqa: BLE001 - the parent reports it; this process only relays
                reply = ("error", "PostgresError", f"the PostgreSQL session failed: {exc!r}", None)
            pickle.dump(reply, answers)
            answers.flush()
    finally:
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - exiting anyway; the server ends the session either way
                pass
        os._exit(0)
