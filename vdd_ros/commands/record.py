"""`vdd-ros record`: live topics of a binding into a rosbag2 (MCAP or sqlite3), or scripted
demonstrations recorded through sim_node and policy_node (`--demonstrate TASK`).

See vdd_ros/ros/recorder.py for what is recorded, the log times and the atomic output.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--binding', default=None,
                        help='binding YAML whose source, sink and marker topics (and /clock) '
                             "are recorded (with --demonstrate: default the task's shipped "
                             'binding)')
    parser.add_argument('--out', required=True,
                        help='bag folder to create (must not exist; renamed into place when '
                             'the recording stops cleanly)')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                        help='rosbag2 storage (default: %(default)s)')
    parser.add_argument('--compress', action='store_true',
                        help='zstd-compress every message (rosbag2 compression mode message)')
    parser.add_argument('--log-time', choices=('publish', 'receive'), default='publish',
                        help="each message's log time: when it was published (default; causal "
                             'on one machine or synchronised hosts) or when it was received '
                             '(what ros2 bag record logs)')
    parser.add_argument('--episodes', type=int, default=None,
                        help='stop after this many episode end markers (with --demonstrate: '
                             'the number of demonstrations, required)')
    parser.add_argument('--duration', type=float, default=None, metavar='S',
                        help='stop after S seconds')
    parser.add_argument('--demonstrate', metavar='TASK', default=None,
                        help='run sim_node (lockstep) and policy_node (the scripted '
                             'demonstrator) on a private ROS domain and record them')
    parser.add_argument('--seed', type=int, default=0,
                        help='with --demonstrate: seed of the first episode, +1 per episode '
                             '(default: %(default)s)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help="ROS domain (default: this shell's; with --demonstrate a random "
                             'free one)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.binding import load_binding
    from vdd_ros.errors import UserError
    from vdd_ros.ros.recorder import check_output, record, record_demonstrations

    if args.domain_id is not None and not 0 <= args.domain_id <= 232:
        raise UserError(f'--domain-id must lie in [0, 232], got {args.domain_id}')
    if args.episodes is not None and args.episodes < 1:
        raise UserError(f'--episodes must be at least 1, got {args.episodes}')
    if args.demonstrate is not None:
        from vdd_ros.sim.tasks import get_task
        get_task(args.demonstrate)
        if args.episodes is None:
            raise UserError('--demonstrate needs --episodes N')
        if args.duration is not None:
            raise UserError('--duration does not apply to --demonstrate (give --episodes)')
        if args.seed < 0 or args.seed + args.episodes > 2 ** 32:
            raise UserError(f'--seed must lie in [0, 2^32 - episodes], got {args.seed}')
        if args.binding is not None:
            load_binding(args.binding)
        if args.log_time != 'publish':
            raise UserError('--demonstrate records publish times (--log-time publish)')
        check_output(args.out)
        summary, episodes = record_demonstrations(
            args.demonstrate, args.out, list(range(args.seed, args.seed + args.episodes)),
            binding=args.binding, storage=args.storage, compress=args.compress,
            show_progress=not args.quiet, domain_id=args.domain_id)
    else:
        if args.binding is None:
            raise UserError('--binding is required (or --demonstrate TASK)')
        binding = load_binding(args.binding)
        summary = record(binding, args.out, args.storage, args.compress, args.episodes,
                         args.duration, show_progress=not args.quiet,
                         domain_id=args.domain_id, log_time=args.log_time)
    for line in summary.lines():
        print(line)
    print(f'-> {summary.out}')
    return 0
