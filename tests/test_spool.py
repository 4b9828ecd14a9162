"""The spool's claim: a backup pushing its last segment makes archive_command's call for it wait (spool.py)."""

from __future__ import annotations

import threading
import time

from pgvault.spool import Spool

SEGMENT = "000000010000000000000007"


def test_no_claim_means_no_wait(tmp_path):
    spool = Spool(str(tmp_path), "main")
    started = time.monotonic()
    assert spool.await_claimed_push(SEGMENT) is False  # no claim file at all
    claim = spool.claim_push(SEGMENT)
    spool.release_claim(claim)
    assert spool.await_claimed_push(SEGMENT) is False  # a claim that ended
    assert time.monotonic() - started < 1


def test_a_claim_on_another_segment_holds_nothing_up(tmp_path):
    spool = Spool(str(tmp_path), "main")
    claim = spool.claim_push("000000010000000000000008")
    try:
        started = time.monotonic()
        assert spool.await_claimed_push(SEGMENT) is False
        assert time.monotonic() - started < 1
    finally:
        spool.release_claim(claim)


def test_a_call_waits_until_the_claim_ends(tmp_path):
    spool = Spool(str(tmp_path), "main")
    claim = spool.claim_push(SEGMENT)
    assert claim is not None
    threading.Timer(0.3, spool.release_claim, args=(claim,)).start()
    started = time.monotonic()
    assert spool.await_claimed_push(SEGMENT, timeout=10) is True
    assert 0.25 < time.monotonic() - started < 5


def test_a_stuck_claim_is_waited_for_only_so_long(tmp_path):
    spool = Spool(str(tmp_path), "main")
    claim = spool.claim_push(SEGMENT)
    try:
        started = time.monotonic()
        assert spool.await_claimed_push(SEGMENT, timeout=0.3) is False  # the caller then pushes the file itself
        assert 0.25 < time.monotonic() - started < 5
    finally:
        spool.release_claim(claim)


def test_one_claim_at_a_time_and_none_without_a_usable_spool(tmp_path):
    spool = Spool(str(tmp_path), "main")
    first = spool.claim_push(SEGMENT)
    assert first is not None
    assert spool.claim_push("000000010000000000000008") is None  # held by someone else
    spool.release_claim(first)
    again = spool.claim_push("000000010000000000000008")
    assert again is not None
    spool.release_claim(again)
    (tmp_path / "file").write_text("not a directory")
    assert Spool(str(tmp_path / "file"), "main").claim_push(SEGMENT) is None  # best effort: no claim, no error
