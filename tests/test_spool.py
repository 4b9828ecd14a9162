"""The spool's claim: a backup pushing its last segment makes archive_command's call for it wait (spool.py)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from pgvault.spool import Spool

SEGMENT = "000000010000000000000007"


@contextmanager
def claimed(spool: Spool, name: str):
    claim = spool.claim_push(name)
    assert claim is not None
    try:
        yield
    finally:
        spool.release_claim(claim)


def timed_await(spool: Spool, name: str, **kw) -> tuple[bool, float]:
    """await_claimed_push's answer, and how long it took to give it."""
    started = time.monotonic()
    return spool.await_claimed_push(name, **kw), time.monotonic() - started


def test_no_claim_means_no_wait(tmp_path):
    spool = Spool(str(tmp_path), "main")
    assert timed_await(spool, SEGMENT)[0] is False  # no claim file at all
    claim = spool.claim_push(SEGMENT)
    spool.release_claim(claim)
    answer, seconds = timed_await(spool, SEGMENT)
    assert answer is False and seconds < 1  # a claim that ended


def test_a_claim_on_another_segment_holds_nothing_up(tmp_path):
    spool = Spool(str(tmp_path), "main")
    with claimed(spool, "000000010000000000000008"):
        answer, seconds = timed_await(spool, SEGMENT)
    assert answer is False and seconds < 1


def test_a_call_waits_until_the_claim_ends(tmp_path):
    spool = Spool(str(tmp_path), "main")
    claim = spool.claim_push(SEGMENT)
    assert claim is not None
    threading.Timer(0.3, spool.release_claim, args=(claim,)).start()
    answer, seconds = timed_await(spool, SEGMENT, timeout=10)
    assert answer is True and 0.25 < seconds < 5


def test_a_stuck_claim_is_waited_for_only_so_long(tmp_path):
    spool = Spool(str(tmp_path), "main")
    with claimed(spool, SEGMENT):
        answer, seconds = timed_await(spool, SEGMENT, timeout=0.3)
    assert answer is False and 0.25 < seconds < 5  # the caller then pushes the file itself


def test_one_claim_at_a_time_and_none_without_a_usable_spool(tmp_path):
    spool = Spool(str(tmp_path), "main")
    with claimed(spool, SEGMENT):
        assert spool.claim_push("000000010000000000000008") is None  # held by someone else
    again = spool.claim_push("000000010000000000000008")
    assert again is not None
    spool.release_claim(again)
    (tmp_path / "file").write_text("not a directory")
    assert Spool(str(tmp_path / "file"), "main").claim_push(SEGMENT) is None  # best effort: no claim, no error
