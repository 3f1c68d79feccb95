"""The heap sits out garbage collection while servers are provisioned (see gcfreeze)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dask_hetzner.gcfreeze import FrozenHeap


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_from_the_first_hold_to_the_last_release() -> None:
    heap = FrozenHeap()
    heap.hold()
    assert gc.get_freeze_count() > 0
    heap.hold()
    heap.release()
    assert gc.get_freeze_count() > 0, "one holder left"
    heap.release()
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_the_process_itself_is_left_frozen() -> None:
    gc.freeze()
    heap = FrozenHeap()
    heap.hold()
    heap.release()
    assert gc.get_freeze_count() > 0
