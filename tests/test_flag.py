"""The flag the daemon's signal handlers set: it takes no lock, so a signal landing anywhere in the main loop,
even in the middle of the loop's own idle wait, sets it (threading.Event.set there can wait forever)."""
from __future__ import annotations

import signal

from agent.flag import SignalFlag


def test_a_signal_during_the_idle_wait_sets_the_flag_and_the_loop_sees_it():
    flag = SignalFlag()
    previous = signal.signal(signal.SIGALRM, flag.set)
    try:
        turns = 0
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        while not flag.is_set() and turns < 1000:
            flag.wait(0.002)
            turns += 1
        assert flag.is_set() and 0 < turns < 1000
        flag.clear()
        assert not flag.is_set() and not flag.wait(0.001)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
