"""`vdd-ros dataset-info`: what a dataset holds (demonstrations, lengths, observation keys and
shapes, action range, environment, filter keys), as an aligned table or JSON. Reads shapes,
attributes and the actions only (see `vdd_ros.core.data.dataset_info`)."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('dataset', help='robomimic-layout (or raw robosuite) .hdf5 file')
    parser.add_argument('--json', action='store_true', help='print the description as JSON')


def _num(value: float) -> str:
    return f'{value:.4g}'


def format_info(info: dict[str, Any]) -> str:
    """The description as an aligned two-column table (indented rows belong to the one
    above)."""
    length = info['length']
    env = info['env_name'] or (f"none (task {info['task']})" if info.get('task') else 'none')
    details = [f"robots {', '.join(info['robots'])}" if info['robots'] else '',
               f"controller {info['controller']}" if info['controller'] else '',
               f"recorded with robosuite {info['env_version']}" if info['env_version'] else '']
    details = [d for d in details if d]
    if details:
        env += f" ({'; '.join(details)})"
    obs_dim = sum(math.prod(s) for s in info['obs'].values())
    rows = [('file', info['path']), ('layout', info['layout']),
            ('demonstrations', str(info['demos'])), ('transitions', str(info['transitions'])),
            ('length', f"mean {length['mean']:.1f}, min {length['min']}, max {length['max']}"),
            ('environment', env),
            ('observations', f"{obs_dim} values in {len(info['obs'])} keys" if info['obs']
             else 'none (raw robosuite: convert with vdd-ros convert-robosuite)')]
    rows += [(f'  {k}', 'x'.join(str(n) for n in s) or 'scalar')
             for k, s in info['obs'].items()]
    rows += [('next_obs', 'yes' if info['next_obs'] else 'no'),
             ('actions', f"{info['action_dim']}-d")]
    rows += [(f'  action[{i}]', f'[{_num(lo)}, {_num(hi)}]')
             for i, (lo, hi) in enumerate(zip(info['action_min'], info['action_max']))]
    rows += [('states', f"{info['state_dim']}-d in every demo" if info['states'] else
              'not in every demo' if info['state_dim'] else 'none'),
             ('filter keys', ', '.join(f"{k} ({n} demo{'' if n == 1 else 's'})" for k, n in
                                       info['filter_keys'].items()) or 'none')]
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from vdd_ros.core.data import dataset_info
    info = dataset_info(args.dataset)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
