"""The control loop's driver: absolute-deadline sleeps, no burst after a stall, idle ticks,
a failing tick, stop."""
import threading
import time

from vdd_ros.ros.control_loop import ControlThread, sleep_until

PERIOD = 0.005


def test_sleep_until_never_wakes_before_its_deadline():
    for delay_ns in (0, 200_000, 1_000_000, 3_000_000):
        deadline = time.monotonic_ns() + delay_ns
        sleep_until(deadline)
        assert time.monotonic_ns() >= deadline
    sleep_until(time.monotonic_ns() - 10_000_000)       # a past deadline returns at once


def run_loop(tick, seconds, **kw):
    loop = ControlThread(PERIOD, tick, **kw)
    loop.start()
    time.sleep(seconds)
    loop.stop()
    assert not loop.running
    return loop


def test_a_stalled_tick_skips_the_periods_it_overran_instead_of_bursting():
    starts = []

    def tick():
        starts.append(time.monotonic())
        if len(starts) == 5:
            time.sleep(8 * PERIOD)          # a stall of 8 periods
    loop = run_loop(tick, 0.3)
    assert loop.skipped >= 7
    # each tick's deadline (its start less its lateness) is a later period than the one
    # before: after the stall no late period was run
    lateness = list(loop.late_ms)[:len(starts)]
    deadlines = [t - late / 1e3 for t, late in zip(starts, lateness)]
    # (a period that was run twice would give a step of 0; the margin is for the moment
    # between the loop's clock reading and the tick's)
    steps = [(b - a) / PERIOD for a, b in zip(deadlines, deadlines[1:])]
    assert min(steps) > 0.5, steps
    assert max(steps) > 8, steps              # the stall's periods were skipped
    # and it never ran more ticks than periods passed
    assert len(starts) + loop.skipped <= (starts[-1] - starts[0]) / PERIOD + 2


def test_a_tick_may_sleep_longer_without_counting_skipped_periods():
    calls = []

    def tick():
        calls.append(time.monotonic())
        return 10 * PERIOD                   # nothing to do for 10 periods
    loop = run_loop(tick, 0.3)
    assert loop.skipped == 0
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps and min(gaps) >= 9 * PERIOD, gaps


def test_a_failing_tick_is_reported_and_the_loop_goes_on():
    errors, ticks = [], []

    def tick():
        ticks.append(1)
        if len(ticks) == 2:
            raise RuntimeError('boom')
    run_loop(tick, 0.1, on_error=errors.append)
    assert [str(e) for e in errors] == ['boom']
    assert len(ticks) > 3


def test_stop_waits_for_the_running_tick():
    inside = threading.Event()
    finished = []

    def tick():
        inside.set()
        time.sleep(0.05)
        finished.append(1)
    loop = ControlThread(PERIOD, tick)
    loop.start()
    assert inside.wait(2.0)
    loop.stop()
    assert not loop.running and finished
