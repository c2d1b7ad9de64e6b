"""`vdd-ros bench --ros`: its summary (median and worst run), table, and argument checks; one
short event-driven run through a real policy_node process."""
from types import SimpleNamespace

import pytest

from vdd_ros.binding import binding_for_task, load_binding
from vdd_ros.cli import main
from vdd_ros.errors import UserError
from vdd_ros.ros.bench import (STAGES, format_table, run_suite, summarise, trajectory_binding,
                               trajectory_stats)


def fake_run(mode, miss, p50, p99, answered, rate=500.0):
    r = {'rate_hz': rate, 'mode': mode, 'deadline_miss_rate': miss,
         'obs_to_action_ms_p50': p50, 'obs_to_action_ms_p99': p99,
         'obs_to_action_ms_max': 3 * p99, 'answered_fraction': answered}
    r.update({f'{k}_{q}': 0.1 for k in STAGES for q in ('p50', 'p99')})
    return r


def test_the_summary_gives_the_median_and_the_worst_run():
    runs = [fake_run('event', m, p, 2 * p, a) for m, p, a in
            [(0.001, 1.0, 1.0), (0.02, 1.5, 0.98), (0.0, 0.9, 1.0), (0.005, 1.1, 0.99),
             (0.003, 1.2, 0.995)]]
    s = summarise(runs)
    assert s['deadline_miss_rate_median'] == 0.003 and s['deadline_miss_rate_worst'] == 0.02
    assert s['obs_to_action_ms_p99_median'] == 2.2 and s['obs_to_action_ms_p99_worst'] == 3.0
    assert s['answered_fraction_median'] == 0.995 and s['answered_fraction_worst'] == 0.98
    assert s['runs_under_1pct_misses'] == 4 and s['runs'] == 5
    assert s['outside_node_ms_p50'] == pytest.approx(1.0)      # 1.1 - the node's 0.1
    tick = summarise([fake_run('thread', 0.0, 1.0, 2.0, 1.0)] * 5)
    assert tick['outside_node_ms_p50'] is None
    table = format_table({'policy': 'default', 'runs': 5, 'duration_s': 5.0, 'load': 1,
                          'summary': [s, tick]})
    assert '    500 event     0.30% [ 2.00%]   1.10 [ 1.50]   2.20 [ 3.00]' in table, table
    assert '    500 event    0.100      -  0.100' in table    # wake-up lateness: thread only
    assert '1 busy process(es)' in table


@pytest.mark.parametrize('kwargs, problem', [
    (dict(runs=4), 'at least 5 runs per rate and mode, got 4'),
    (dict(modes=['thread', 'spin']), "unknown ['spin']"),
    (dict(rates=[0.0]), 'must be > 0'),
])
def test_bad_suite_arguments_are_one_error_before_any_run(kwargs, problem):
    args = dict(policy='tiny', rates=[500.0], modes=['event'], runs=5) | kwargs
    with pytest.raises(UserError, match=problem.replace('[', r'\[').replace(']', r'\]')):
        run_suite(**args)


def test_the_cli_names_a_bad_run_count_in_one_line(capsys):
    assert main(['bench', '--ros', '--runs', '2', '--json', '/tmp/never_written.json']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['vdd-ros bench: error: --runs: at least 5 runs per rate and mode, got 2']


def test_an_event_driven_run_answers_on_arrival_and_times_each_answer(checkpoint):
    from vdd_ros.ros.bench import benchmark_latency
    from vdd_ros.ros.testing import domain_id
    r = benchmark_latency(checkpoint, 200.0, duration_s=1.5, domain_id=domain_id(),
                          act_on='complete')
    assert r['policy_exit_status'] == 0 and r['act_on'] == 'complete'
    assert r['answered_fraction'] >= 0.9, r
    # acting on arrival: no tick wait, and one deadline per answer: no periods to skip, a
    # miss is an answer later than one period (the node's counts cover whole diagnostics
    # periods, the source's its own window: they are compared loosely)
    assert r['obs_age_ms_p50'] == 0.0 and r['answer_ms_p50'] > 0.0
    assert r['skipped_periods'] == 0 and r['deadline_misses'] == r['overruns'], r
    assert r['policy_ticks'] >= 0.5 * r['observations_answered'], r


class FakeTime:
    def __init__(self, s):
        self.sec, self.nanosec = int(s), round((s - int(s)) * 1e9)


class FakePoint:
    def __init__(self, s):
        self.time_from_start = FakeTime(s)


class FakeTrajectory:
    def __init__(self, n, period):
        self.points = [FakePoint((k + 1) * period) for k in range(n)]


def test_trajectory_stats_say_how_far_each_chunk_reaches_past_the_next_message(tmp_path):
    binding = load_binding(trajectory_binding(tmp_path / 'b.yaml', 'lift_carry'))
    assert binding.action[0].type == 'trajectory_msgs/msg/JointTrajectory'
    assert binding.action[1] == binding_for_task('lift_carry').action[1]
    topic = binding.action[0].topic
    # 4 points 10 ms apart, one message every 10 ms; the 4th arrives 45 ms late
    arrivals = [0.0, 0.01, 0.02, 0.065]
    received = {topic: [(t, k, None, FakeTrajectory(4 - k % 4, 0.01))
                        for k, t in enumerate(arrivals)]}
    probe = SimpleNamespace(binding=binding, received=received)
    s = trajectory_stats(probe, [0, 1, 2, 3])
    assert s['trajectory_messages'] == 4 and s['trajectory_points_min'] == 1
    assert s['trajectory_points_mean'] == 2.5
    # reaches: 40, 30, 20 ms after arrival; margins 30, 20, -25 ms
    assert s['trajectory_margin_ms_min'] == pytest.approx(-25.0)
    assert s['trajectory_covered_fraction'] == pytest.approx(2 / 3)
    assert s['trajectory_points_per_s'] == pytest.approx(9 / 0.065)


def test_a_chunked_policy_sends_the_rest_of_its_chunk_as_one_trajectory():
    from vdd_ros.ros.bench import benchmark_latency
    from vdd_ros.ros.testing import domain_id
    r = benchmark_latency('tiny', 50.0, duration_s=2.0, domain_id=domain_id(), chunk=4,
                          raw_source=True)
    assert r['policy_exit_status'] == 0 and r['path'].startswith('binding')
    assert r['answered_fraction'] >= 0.8, r
    # 4 actions per pass, 2 acted out: each message carries the action and the rest of the
    # chunk, 4 then 3 points, reaching 3 periods past the next message at the least
    assert r['trajectory_points_min'] == 3 and 3.0 <= r['trajectory_points_mean'] <= 4.0, r
    assert r['trajectory_messages_per_s'] == pytest.approx(50.0, rel=0.2), r
    assert r['trajectory_margin_ms_p50'] > 0, r
