"""Backups: physical base backups (full and block-level incremental) and their materializer.

Modules, one job each: ``layout`` (labels and keys), ``manifest`` (the manifest
and files.jsonl records), ``scan`` (walking a data directory, exclusions),
``blockmap`` (pure block bookkeeping: locations, changes, the merge-join),
``blocks`` (reading and hashing blocks), ``copy`` (files into objects, in
parallel), ``pgsession`` (the backup's PostgreSQL session, in a child process
for the CLI), ``session`` (the PostgreSQL side: checks, the WAL wait),
``lock`` (one backup at a time), ``leftovers`` (interrupted backups),
``physical`` (take_backup: the orchestration), ``materialize`` (a data
directory back from a manifest) and ``errors``.

The library API: ``physical.take_backup``, ``manifest.list_backups`` /
``read_manifest`` / ``iter_files``, ``leftovers.find_leftovers`` and
``materialize.materialize_backup``.
"""
