"""Errors of physical backups and of materializing them (defined in the one hierarchy, pgvault.errors)."""

from pgvault.errors import BackupError, BackupInProgressError, BackupNotFoundError, WalArchiveTimeoutError

__all__ = ["BackupError", "BackupInProgressError", "BackupNotFoundError", "WalArchiveTimeoutError"]
