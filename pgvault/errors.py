"""One error hierarchy for the whole package.

Every error carries a one-line message, a stable exit code (the CLI exits with
it, the README lists them) and, where it helps an operator, a hint of what to do.
Code below the CLI raises these and never prints; only the CLI catches broadly.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the archive fast path ~2 ms

if TYPE_CHECKING:  # only for annotations: the planner imports this module
    from pgvault.planner import RestorablePoint, RestorableWindow


class PgvaultError(Exception):
    """Base of every error pgvault raises on purpose."""

    exit_code = 1
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class ConfigError(PgvaultError):
    """The configuration file or an environment override is invalid."""

    exit_code = 10


class EncryptionKeyError(PgvaultError):
    """A key file is missing, unreadable, too open, or not the vault's key."""

    exit_code = 11


class StorageError(PgvaultError):
    """The vault cannot be reached or refused an operation."""

    exit_code = 20


class VaultUnreachableError(StorageError):
    """Endpoint down, bucket missing, credentials refused: retrying later may help."""

    exit_code = 21


class ObjectExistsError(StorageError):
    """A write-once object already exists with different content."""

    exit_code = 22


class ObjectNotFoundError(StorageError):
    """The object asked for is not in the vault."""

    exit_code = 23


class CorruptObjectError(PgvaultError):
    """An object failed its integrity checks (checksum, authentication, framing)."""

    exit_code = 24
    default_hint = "the object was damaged or altered in the vault; run `pgvault verify` and restore from another copy"


class VaultMismatchError(PgvaultError):
    """The vault belongs to another cluster, or its format is not understood."""

    exit_code = 25


class VaultNotInitializedError(PgvaultError):
    """There is no vault record for this cluster yet."""

    exit_code = 26
    default_hint = "run `pgvault init` first"


class PostgresError(PgvaultError):
    """PostgreSQL cannot be reached or answered with an error."""

    exit_code = 30


class ArchiveDivergenceError(PgvaultError):
    """A WAL file already archived under this name has different content."""

    exit_code = 40
    default_hint = (
        "two servers may be writing the same timeline (split brain); "
        "stop the one that is not the primary and compare before archiving again"
    )


class ForeignWalError(PgvaultError):
    """A WAL file does not belong to the cluster this vault was created for."""

    exit_code = 41


class WalFormatError(PgvaultError):
    """A WAL file name, LSN, timeline history or WAL page header is malformed."""

    exit_code = 42


class CheckFailedError(PgvaultError):
    """`pgvault check` found at least one failing item."""

    exit_code = 50


class DumpError(PgvaultError):
    """A logical dump or its restore failed: pg_dump/pg_restore of the wrong version or
    failing, a database missing from the server or the dump, a target database that exists."""

    exit_code = 60


class TargetError(PgvaultError):
    """A recovery target (`--to`) or timeline (`--timeline`) given on the command line is malformed."""

    exit_code = 70


class BackupError(PgvaultError):
    """A backup cannot be taken or read: wrong data directory, archiving off, role mismatch, bad manifest."""

    exit_code = 80


class BackupInProgressError(BackupError):
    """Another backup of this cluster holds the backup lock."""

    exit_code = 81


class WalArchiveTimeoutError(BackupError):
    """The WAL a backup needs did not reach the vault in time: the backup is not committed."""

    exit_code = 82


class BackupNotFoundError(BackupError):
    """No committed backup (manifest) has this label."""

    exit_code = 83


class PlanError(PgvaultError):
    """The target cannot be reached; ``earliest``/``latest`` bound what can be (None when nothing can)."""

    exit_code = 71
    default_hint = (
        "choose a target inside the restorable window; `pgvault list` shows the archived WAL and its gaps"
    )

    def __init__(
        self,
        message: str,
        *,
        earliest: RestorablePoint | None = None,
        latest: RestorablePoint | None = None,
        window: RestorableWindow | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.earliest = earliest
        self.latest = latest
        self.window = window


class RestoreError(PgvaultError):
    """A restore was refused or failed before PostgreSQL ran: running server, non-empty directory, bad input."""

    exit_code = 90


class RecoveryError(PgvaultError):
    """PostgreSQL did not reach the recovery target: it stopped with a FATAL error, paused elsewhere, or timed out."""

    exit_code = 91


class DaemonError(PgvaultError):
    """`pgvault daemon` cannot start or run: its state directory, its metrics address, a job it cannot start."""

    exit_code = 110


class DaemonAlreadyRunningError(DaemonError):
    """Another `pgvault daemon` for this cluster and vault runs on this host."""

    exit_code = 111


class DrillError(PgvaultError):
    """A restore drill failed: no backup to restore, the restore or recovery failed, or a sanity check failed."""

    exit_code = 112


class VerifyFailedError(PgvaultError):
    """`pgvault verify` found a problem: a missing or damaged object, a broken chain, a gap in the WAL."""

    exit_code = 105


class ExpireError(PgvaultError):
    """`pgvault expire` refused to run its plan: it would remove something a kept backup needs."""

    exit_code = 106


class ReseedError(PgvaultError):
    """`pgvault reseed` refused or could not rebuild the node: a server runs there that is not a healthy
    standby, the primary is not a primary of this cluster, a non-empty directory without --delta."""

    exit_code = 100


class OrphanError(PgvaultError):
    """The node's diverged WAL could not be read or kept in the vault: reseed changed nothing."""

    exit_code = 101


class StreamingTimeoutError(PgvaultError):
    """The reseeded node did not stream from the primary with its lag under the limit in time (it still runs)."""

    exit_code = 102


#: Exit codes documented in the README, by class, in one place.
EXIT_CODES: dict[type[PgvaultError], int] = {
    cls: cls.exit_code
    for cls in (
        PgvaultError,
        ConfigError,
        EncryptionKeyError,
        StorageError,
        VaultUnreachableError,
        ObjectExistsError,
        ObjectNotFoundError,
        CorruptObjectError,
        VaultMismatchError,
        VaultNotInitializedError,
        PostgresError,
        ArchiveDivergenceError,
        ForeignWalError,
        WalFormatError,
        CheckFailedError,
        TargetError,
        PlanError,
        BackupError,
        BackupInProgressError,
        WalArchiveTimeoutError,
        BackupNotFoundError,
        DumpError,
        RestoreError,
        RecoveryError,
        ReseedError,
        OrphanError,
        StreamingTimeoutError,
        DaemonError,
        DaemonAlreadyRunningError,
        DrillError,
        VerifyFailedError,
        ExpireError,
    )
}
