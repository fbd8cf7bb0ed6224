"""The core's cap on team sizes on a busy host (cpp/include/pyrnn/busy_host.hpp), replayed.

Each event is a call that asks for some threads at a time (ns) and runs one region (or several)
on what it was allowed, and what each region measured: its wall time, and the work its threads
did (their CPU time less the time they spun at barriers), summed over them. Nothing here is timed:
the times are given.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyrnn import _core

pytestmark = pytest.mark.skipif(not hasattr(_core, "_impl"), reason="C++ core not built")

MS = 1e6
REGION = 5 * MS  # wall time of each region


def quiet(now_ms, wanted=2, regions=1):
    """A call whose threads had their cores the whole time."""
    return (now_ms * MS, wanted, REGION, wanted * REGION * 0.98, regions, True)


def busy(now_ms, wanted=2, speedup=0.8, regions=1):
    """A call whose `wanted` threads got `speedup` threads' worth of work done."""
    return (now_ms * MS, wanted, REGION, speedup * REGION, regions, True)


def replay(events):
    return _core._impl._team_cap_for_tests(events)


def test_quiet_host_keeps_the_whole_team():
    assert replay([quiet(t) for t in range(10)]) == [2] * 10


def test_a_starved_team_caps_later_calls_at_the_work_it_got_done():
    assert replay([busy(0), quiet(1), quiet(2)]) == [2, 1, 1]
    eight = [busy(0, 8, speedup=3.5), quiet(1, 8), quiet(2, 4)]
    assert replay(eight) == [8, 3, 3]


def test_a_short_starved_region_among_quiet_ones_is_no_reason():
    short = (2 * MS, 2, 0.5 * MS, 0.2 * MS, 1, True)  # 0.4 threads' work, for half a millisecond
    assert replay([quiet(0), quiet(1), short, quiet(3), quiet(4)]) == [2] * 5


def test_late_start_of_a_woken_worker_is_not_starvation():
    # 150 us regions of two threads, the worker 80 us late: slower than one thread, but briefly
    short = [(t * MS, 2, 150e3, 130e3, 1, True) for t in range(20)]
    assert replay(short) == [2] * 20


def test_a_team_that_beats_one_thread_is_not_capped():
    # off their cores a third of the time, two threads still do 1.3 threads' work
    assert replay([busy(t, speedup=1.3) for t in range(20)]) == [2] * 20


def test_a_host_busy_half_the_time_keeps_a_team_that_gains_more_than_it_loses():
    # alternately starved (0.6 threads' work) and quiet: 1.3 threads' work on average
    events = [busy(t, speedup=0.6) if t % 2 else quiet(t) for t in range(40)]
    assert replay(events) == [2] * 40


def test_probe_after_the_hold_lifts_the_cap_on_a_quiet_host():
    assert replay([busy(0), quiet(10), quiet(22), quiet(23)]) == [2, 1, 2, 2]


def test_after_a_lifted_cap_starving_again_sets_it_for_longer():
    # lifted by the probe at 22 ms; starved again at 30 ms: capped with the hold doubled to 40 ms
    events = [busy(0), quiet(22), busy(30, regions=6), quiet(60), quiet(71)]
    assert replay(events) == [2, 2, 2, 1, 2]


def test_starving_again_seconds_after_a_lift_keeps_the_longer_hold():
    # lifted at 22 ms; starved again 5 s later: the hold doubles to 40 ms; 11 s later: 20 ms
    events = [busy(0), quiet(22), busy(5022), quiet(5050), quiet(5063)]
    assert replay(events) == [2, 2, 2, 1, 2]
    events = [busy(0), quiet(22), busy(11022), quiet(11043), quiet(11044)]
    assert replay(events) == [2, 2, 2, 2, 2]


def no_free_cores(event):
    return (*event[:5], False)


def test_a_probe_waits_while_the_host_has_no_free_cores():
    # due at 20 ms, postponed by a hold at 22 and 43 ms; at 64 ms the cores are free
    events = [busy(0), no_free_cores(quiet(22)), no_free_cores(quiet(43)), quiet(64), quiet(65)]
    assert replay(events) == [2, 1, 1, 2, 2]


def test_a_host_that_stays_busy_sees_a_probe_every_eight_holds():
    events = [busy(0)] + [no_free_cores(quiet(21 * k)) for k in range(1, 11)]
    assert replay(events) == [2] + [1] * 8 + [2, 2]


def test_a_call_of_many_regions_caps_the_calls_after_it():
    assert replay([busy(0, regions=5), quiet(1), quiet(2)]) == [2, 1, 1]


def test_a_probing_call_counts_once_however_many_regions_it_runs():
    # the probe at 22 ms fails in all its 50 regions: the hold doubles once (to 40 ms), no more
    events = [busy(0), busy(22, regions=50), quiet(50), quiet(61), quiet(63)]
    assert replay(events) == [2, 2, 1, 1, 2]


def test_a_probe_that_runs_no_team_leaves_the_next_call_to_tell():
    # the probe at 22 ms runs only one-thread regions; the call at 23 ms is capped, and the cap
    # holds until the next probe, 20 ms after the last
    events = [busy(0), quiet(22, regions=0), quiet(23), quiet(43), quiet(44)]
    assert replay(events) == [2, 2, 1, 2, 2]


def test_backend_info_reports_the_team_cap():
    import pyrnn

    pyrnn.set_adaptive_threads(True)
    try:
        x = np.ones((20, 64, 16), np.float32)
        with pyrnn.no_grad():
            pyrnn.GRU(16, 256, backend="cpp")(x)  # some teams of two, measured
        info = pyrnn.backend_info()["team_cap"]
        assert set(info) == {"enabled", "cap", "regions", "lost", "probes", "postponed"}
        assert info["enabled"] is True
        assert info["cap"] is None or info["cap"] >= 1
        assert 0 <= info["lost"] <= info["regions"]
    finally:
        pyrnn.set_adaptive_threads(False)


def test_switched_off_nothing_is_measured_or_capped():
    import pyrnn

    pyrnn.set_adaptive_threads(False)
    x = np.ones((20, 64, 16), np.float32)
    with pyrnn.no_grad():
        pyrnn.GRU(16, 256, backend="cpp")(x)
    assert pyrnn.backend_info()["team_cap"] == {
        "enabled": False, "cap": None, "regions": 0, "lost": 0, "probes": 0, "postponed": 0}


def test_set_adaptive_threads_takes_a_bool():
    import pyrnn

    with pytest.raises(TypeError, match="enabled must be a bool"):
        pyrnn.set_adaptive_threads(1)


def test_failed_probe_keeps_the_cap_and_doubles_the_hold():
    # capped at 0 ms for 20 ms; the probe at 22 ms fails: the next is due 40 ms later
    events = [busy(0), busy(22), quiet(50), quiet(61), quiet(63)]
    assert replay(events) == [2, 2, 1, 1, 2]


def test_holds_stop_doubling_at_a_second():
    events, allowed = [busy(0)], [2]
    last, hold = 0.0, 20.0  # capped at 0 ms for 20 ms
    for _ in range(8):  # probes at 21, 62, 143, ... ms, each failing
        last += hold + 1
        hold = min(2 * hold, 1000.0)
        events += [busy(last), busy(last + 0.9 * hold)]  # the probe; then, within the hold, capped
        allowed += [2, 1]
    events.append(busy(last + hold + 1))  # a second after the last probe: probing again
    assert replay(events) == allowed + [2]


def test_rejects_a_team_of_no_threads():
    with pytest.raises(ValueError, match="wanted"):
        replay([(0.0, 0, 1.0, 1.0, 1, True)])
