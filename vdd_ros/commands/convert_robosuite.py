"""`vdd-ros convert-robosuite`: raw robosuite demonstrations (states and actions) to the
robomimic layout by state replay, with per-demo success and the replay speed against bare
robosuite stepping (see `vdd_ros.sim.convert`)."""
from __future__ import annotations

import argparse
from typing import Any

from vdd_ros.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('raw', help="robosuite recording (.hdf5: data/demo_<i>/{states, "
                        "actions}, data attributes env and env_info)")
    parser.add_argument('--out', required=True, help='output .hdf5 file (written atomically)')
    parser.add_argument('--obs-keys', nargs='+', default=None, metavar='KEY',
                        help='observation keys to write, robomimic or robosuite names (default: '
                             "every low-dimensional observation; robomimic's usual Lift keys "
                             'are robot0_eef_pos robot0_eef_quat robot0_gripper_qpos object)')
    parser.add_argument('--valid-fraction', type=float, default=0.1,
                        help='share of demonstrations in mask/valid (default 0.1)')
    parser.add_argument('--bench-steps', type=int, default=200, metavar='N',
                        help='zero-action robosuite steps timed for the bare stepping rate '
                             '(0: skip; default 200)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def format_report(s: dict[str, Any]) -> str:
    """The per-demo success table and the conversion figures."""
    rows = [('demo', 'steps', 'success', 'first success', 'last state')]
    for d in s['demos']:
        rows.append((d['name'], str(d['steps']), 'yes' if d['success'] else 'NO',
                     '-' if d['first_success'] is None else str(d['first_success']),
                     'success' if d['final_success'] else 'no success'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    wins = sum(d['success'] for d in s['demos'])
    lines.append(f"{wins}/{len(s['demos'])} demonstrations reach success by their recorded "
                 'states')
    lines.append(f"{s['transitions']} transitions -> {s['out']} (obs {s['obs_dim']}-d from "
                 f"{len(s['obs_fields'])} keys; {s['train']} train, {s['valid']} valid demos)")
    lines.append(f"keys learners take by default: {', '.join(s['default_keys'])} "
                 '(others by name: --obs-keys)')
    speed = f"replay {s['transitions_per_s']:.0f} transitions/s"
    if s['bare_steps_per_s']:
        speed += (f"; bare robosuite {s['env_name']} stepping (zero actions) "
                  f"{s['bare_steps_per_s']:.0f} steps/s "
                  f"({s['transitions_per_s'] / s['bare_steps_per_s']:.1f}x)")
    lines.append(speed)
    lines.append(f"recorded with robosuite {s['recorded_with'] or 'unknown'}, replayed in "
                 f"{s['robosuite']}; {s['wall_s']:.1f} s in all")
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    from vdd_ros.sim.convert import convert_robosuite
    out = str(args.out)
    if not out.endswith(('.hdf5', '.h5')):
        raise UserError(f'--out must name an .hdf5 file, got {out}')
    if args.bench_steps < 0:
        raise UserError(f'--bench-steps: must be >= 0, got {args.bench_steps}')
    summary = convert_robosuite(args.raw, out, obs_keys=args.obs_keys,
                                valid_fraction=args.valid_fraction,
                                show_progress=not args.quiet, bench_steps=args.bench_steps)
    print(format_report(summary))
    return 0
