"""Assertions shared by the table-driven tests."""

from contextlib import contextmanager

import pytest


@contextmanager
def raises_exactly(cls, message):
    """Assert the exact error class (not a subclass) and the exact message."""
    with pytest.raises(cls) as info:
        yield info
    assert type(info.value) is cls
    assert str(info.value) == message
