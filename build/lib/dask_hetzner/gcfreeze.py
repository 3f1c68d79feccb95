"""While servers are provisioned, the process's older objects sit out garbage collection.

Starting servers allocates tens of thousands of objects (SSH connections, API answers), and
many die in reference cycles, so the interpreter runs full collections meanwhile. Each walks
the whole heap: some 100,000 objects once distributed is imported, 70 ms and more with the
event loop stopped (the Jupyter server and the client share it). ``gc.freeze()`` moves the heap
as it is into the permanent generation, so those collections walk only what is new (about
10 ms at 50 servers); ``gc.unfreeze()`` hands it back once the last provisioning has ended,
and garbage among it is collected as before from then on. Both are O(1).

A process that froze its heap itself (a pre-forking server) is left alone.
"""

from __future__ import annotations

import gc
import threading


class FrozenHeap:
    """Counts holders: the heap is frozen from the first ``hold`` to the last ``release``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._frozen = False

    def hold(self) -> None:
        with self._lock:
            self._holders += 1
            if self._holders == 1 and gc.get_freeze_count() == 0:
                gc.freeze()
                self._frozen = True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._frozen:
                gc.unfreeze()
                self._frozen = False


# One per process: every cluster's provisioning shares the interpreter's heap.
HEAP = FrozenHeap()
