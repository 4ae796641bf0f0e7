"""A flag that a signal handler may set.

Python runs a signal handler in the main thread between two bytecodes of whatever it was doing. A handler
that takes a lock (`threading.Event.set` does) waits forever when the code it interrupted holds that lock,
as the main loop's `Event.wait` does for a moment on every idle turn: SIGTERM then never stops the daemon.
Setting a plain attribute takes no lock.
"""
from __future__ import annotations

import time


class SignalFlag:
    """`threading.Event`'s set / clear / is_set / wait, without a lock; `wait` sleeps its timeout out."""

    def __init__(self) -> None:
        self._set = False

    def set(self, *_) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        if not self._set:
            time.sleep(timeout)
        return self._set
