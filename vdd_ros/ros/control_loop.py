"""The policy node's periodic drivers: an executor timer, or a dedicated thread with absolute
deadlines.

The thread sleeps until each deadline on CLOCK_MONOTONIC with `clock_nanosleep(TIMER_ABSTIME)`
(the GIL released while it sleeps, no drift from computing relative sleeps), at a timer slack
of 1 µs (Linux adds 50 µs by default), optionally under SCHED_FIFO, and calls the tick from
that thread. A period that cannot be kept is skipped, not caught up with a burst of ticks.
The executor timer (rclpy's, on the steady clock; the default) dispatches its ticks between
subscription callbacks in the executor thread. With the thread, the tick and the executor's
callbacks are two Python threads that take turns on the GIL: on a 2-core machine at 1 kHz
that cost more than the timer's jitter (see the README's measurements).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

from vdd_ros.errors import UserError

LOOPS = ('thread', 'timer')
NS = 1_000_000_000
CLOCK_MONOTONIC = 1
TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29
SWITCH_INTERVAL_S = 2e-4   # the longest another thread may hold the GIL once the tick waits


class _Timespec(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]


def _libc() -> Any:
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        libc.clock_nanosleep.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Timespec), ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def sleep_until(deadline_ns: int) -> None:
    """Sleep until `deadline_ns` on the monotonic clock (time.monotonic_ns): an absolute
    clock_nanosleep where libc has one (interrupted sleeps resume), else time.sleep."""
    if _LIBC is None:
        delay = deadline_ns - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / NS)
        return
    ts = _Timespec(deadline_ns // NS, deadline_ns % NS)
    while _LIBC.clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ctypes.byref(ts), None) == 4:
        pass   # EINTR: a signal arrived; the deadline is absolute, so sleep on


def set_timer_slack(ns: int = 1000) -> bool:
    """Let this thread's sleeps end within `ns` of their deadline (Linux; False elsewhere)."""
    if _LIBC is None:
        return False
    return _LIBC.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) == 0


def set_realtime_priority(priority: int, logger: Any) -> bool:
    """Run the calling thread under SCHED_FIFO at `priority`; warn when not allowed."""
    if not 1 <= priority <= 99:
        raise UserError(f'parameter realtime_priority: must be 0 or 1-99, got {priority}')
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, PermissionError, OSError) as exc:
        logger.warning(f'cannot use SCHED_FIFO priority {priority} ({exc}); keeping the '
                       'normal scheduler (needs CAP_SYS_NICE or an rtprio limit)')
        return False
    logger.info(f'control loop runs under SCHED_FIFO priority {priority}')
    return True


class ControlThread:
    """Calls `tick()` once per period from its own thread, at absolute deadlines; a tick may
    return a number of seconds to sleep longer (e.g. a watchdog with nothing to do until it
    expires), which counts as no skipped period.

    `late_ms` keeps the recent wake-up lateness (tick start minus its deadline, in ms: the
    OS wake-up plus the wait for the GIL); `skipped` counts periods that were not kept (a tick
    or a stall ran past the next deadline). `tick` exceptions are reported through `on_error`
    and the loop goes on; `stop()` ends it and waits for the current tick.
    """

    def __init__(self, period_s: float, tick: Callable[[], float | None], *,
                 name: str = 'control',
                 priority: int = 0, logger: Any = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 window: int = 2000) -> None:
        self.period_ns = max(1, int(round(period_s * NS)))
        self.tick, self.priority, self.logger, self.on_error = tick, priority, logger, on_error
        self.late_ms: deque = deque(maxlen=window)
        self.skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        # while the tick waits for the GIL, another thread keeps it at most this long
        # (the interpreter's default is 5 ms, longer than a 500 Hz period)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        set_timer_slack(1000)
        if self.priority:
            set_realtime_priority(self.priority, self.logger)
        period = self.period_ns
        deadline = time.monotonic_ns() + period
        while not self._stop.is_set():
            sleep_until(deadline)
            if self._stop.is_set():
                break
            start = time.monotonic_ns()
            self.late_ms.append((start - deadline) / 1e6)
            idle = None
            try:
                idle = self.tick()
            except Exception as exc:  # the loop outlives a failing tick
                if self.on_error is None:
                    raise
                self.on_error(exc)
            deadline += period
            if idle is not None and idle > period / NS:   # nothing to do for a while
                deadline += period * int(idle * NS // period - 1)
            behind = time.monotonic_ns() - deadline
            if behind > 0:       # skip the periods already past: no burst of late ticks
                missed = behind // period + 1
                self.skipped += missed
                deadline += missed * period


class TimerLoop:
    """The executor-timer fallback with ControlThread's interface (its ticks run in the
    executor thread between callbacks; the timer starts with the node)."""

    def __init__(self, node: Any, period_s: float, tick: Callable[[], None]) -> None:
        self.late_ms: deque = deque(maxlen=1)
        self.skipped = 0
        self.running = True
        self._timer = node.create_steady_timer(period_s, tick)

    def start(self) -> None:
        """(The timer runs once the node spins.)"""

    def stop(self, timeout_s: float = 2.0) -> None:
        self._timer.cancel()
        self.running = False
