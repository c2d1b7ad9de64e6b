"""Results of a pipeline run: metrics.json, report.md, plots, and a summary across tasks.

`assemble_metrics` gathers a task folder's evaluations, stage markers and loss histories into
one dict (written as metrics.json); `render_task_report` writes report.md and the plots from
metrics.json alone, so `vdd-ros report` can redraw them; `write_summary` tabulates every task
folder that has a metrics.json and checks the cross-task target.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from vdd_ros.core.io import atomic_path, write_text
from vdd_ros.errors import UserError

POLICY_ORDER = ('teacher', 'teacher_1step', 'vdd_moe', 'gaussian_bc', 'em_moe')
TRAINED = ('teacher', 'vdd_moe', 'gaussian_bc', 'em_moe')
PLOTS = {
    'success_entropy': 'plots/success_entropy.png',
    'latency': 'plots/latency.png',
    'training_curves': 'plots/training_curves.png',
}
REPORT_OUTPUTS = ('metrics.json', 'report.md', *PLOTS.values())
# Per-task targets (never loosened): name -> description
TARGETS = {
    'success_vs_teacher': "VDD-MoE success >= teacher's - 0.05",
    'success_floor': 'VDD-MoE success >= 0.85',
    'mode_entropy': "VDD-MoE mode entropy >= 0.8 x teacher's",
    'latency': "VDD-MoE per-action latency >= 8x lower than the teacher's (default steps)",
}
CROSS_TASK_WINS = 2      # tasks on which the VDD-MoE must beat both baselines on success
ALL_TASKS = 3
HISTORY_POINTS = 400     # loss-history points kept per model in metrics.json
# The fields of an evaluation that metrics.json keeps (episodes_detail stays in eval/)
EVAL_FIELDS = (
    'label', 'episodes', 'successes', 'success_rate', 'mode_counts', 'mode_entropy',
    'mean_length', 'mean_length_success', 'latency_ms_p50', 'latency_ms_p99',
    'latency_ms_mean', 'query_ms_p50', 'query_ms_p99', 'query_ms_mean', 'query_count',
    'obs_to_action_ms_p50', 'obs_to_action_ms_p99', 'obs_to_action_ms_mean',
    'deadline_miss_rate', 'control_rate_hz', 'via_ros', 'sampling_steps', 'expert_mode',
    'workers', 'wall_s', 'device')


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds')


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f'{path}: missing (run `vdd-ros pipeline` first)') from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f'{path}: unreadable ({exc})') from None


# -- metrics ----------------------------------------------------------------------------------
def check_targets(policies: Mapping[str, Mapping[str, Any]],
                  modes_defined: bool = True) -> list[dict[str, Any]]:
    """The per-task targets as rows: name, description, value, required, met (the mode
    entropy target only where the task defines modes)."""
    vdd, teacher = policies['vdd_moe'], policies['teacher']
    speedup = teacher['query_ms_p50'] / max(vdd['query_ms_p50'], 1e-9)
    rows = [
        ('success_vs_teacher', vdd['success_rate'], teacher['success_rate'] - 0.05),
        ('success_floor', vdd['success_rate'], 0.85),
        *([('mode_entropy', vdd['mode_entropy'], 0.8 * teacher['mode_entropy'])]
          if modes_defined else []),
        ('latency', speedup, 8.0),
    ]
    return [{'name': name, 'description': TARGETS[name], 'value': float(value),
             'required': float(required), 'met': bool(value >= required - 1e-12)}
            for name, value, required in rows]


def beats_baselines(policies: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the VDD-MoE's success rate is above both Gaussian BC's and the EM-MoE's."""
    vdd = policies['vdd_moe']['success_rate']
    return vdd > policies['gaussian_bc']['success_rate'] and \
        vdd > policies['em_moe']['success_rate']


def _downsample(history: list[list[float]], points: int = HISTORY_POINTS) -> list[list[float]]:
    """Mean loss over equal bins of iterations (at most `points` bins)."""
    if len(history) <= points:
        return [[int(i), float(v)] for i, v in history]
    size = len(history) / points
    out = []
    for b in range(points):
        chunk = history[int(b * size):int((b + 1) * size)]
        out.append([int(chunk[-1][0]), float(sum(v for _, v in chunk) / len(chunk))])
    return out


def assemble_metrics(folder: str | os.PathLike, config: Mapping[str, Any],
                     train: Mapping[str, Any], stage_order: list[str] | None = None
                     ) -> dict[str, Any]:
    """metrics.json of a task folder whose evaluations are done (stages in `stage_order`)."""
    from vdd_ros.core.checkpoint import read_training
    folder = Path(folder)
    policies: dict[str, dict[str, Any]] = {}
    seeds: list[int] = []
    for name in POLICY_ORDER:
        ev = _read_json(folder / 'eval' / f'{name}.json')
        policies[name] = {k: ev[k] for k in EVAL_FIELDS if k in ev}
        seeds = [d['seed'] for d in ev.get('episodes_detail', [])]
    teacher_ms = policies['teacher']['query_ms_p50']
    for m in policies.values():
        m['speedup_vs_teacher'] = teacher_ms / m['query_ms_p50'] if m['query_ms_p50'] > 0 \
            else None
    imported = _read_json(folder / 'stages' / 'dataset.json') \
        if (folder / 'stages' / 'dataset.json').is_file() else None
    targets = check_targets(policies, modes_defined=imported is None)
    stages = {}
    order = {name: i for i, name in enumerate(stage_order or [])}
    markers = sorted((folder / 'stages').glob('*.json'),
                     key=lambda path: (order.get(path.stem, len(order)), path.stem))
    for marker in markers:
        data = _read_json(marker)
        stages[data['stage']] = {'wall_s': data.get('wall_s'), 'finished': data.get('finished'),
                                 'info': data.get('info', {})}
    training = {}
    for name in TRAINED:
        curve = read_training(folder / name)
        training[name] = {'iterations': curve['iterations'],
                          'loss_history': _downsample(curve['loss_history'])}
    collect = stages.get('collect', stages.get('bag2dataset', stages.get('dataset', {}))) \
        .get('info', {})
    return {
        'task': folder.name,
        **({'dataset_run': {**imported['info'], 'source': imported['settings']['path'],
                            'filter_key': imported['settings'].get('filter_key')}}
           if imported else {}),
        'generated': _now(),
        'policies': policies,
        'targets': targets,
        'targets_met': all(t['met'] for t in targets),
        'beats_baselines': beats_baselines(policies),
        'settings': {
            'config': dict(config), 'train': dict(train),
            'dataset': {'demos': collect.get('kept'), 'mode_counts': collect.get('mode_counts'),
                        'mean_length': collect.get('mean_length'),
                        'attempts': collect.get('attempts'),
                        'first_seed': config.get('collect_seed')},
            'eval_seeds': seeds,
        },
        'stages': {k: {'wall_s': v['wall_s'], 'finished': v['finished']}
                   for k, v in stages.items()},
        'training': training,
    }


# -- report.md --------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = '.3f') -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '-'
    return format(value, spec)


def _modes(m: Mapping[str, Any]) -> str:
    wins = m['successes']
    return ', '.join(f'{k} {v} ({v / wins:.0%})' if wins else f'{k} 0'
                     for k, v in m['mode_counts'].items()) or 'no modes defined'


def _entropy(m: Mapping[str, Any]) -> str:
    return f"{m['mode_entropy']:.3f}" if m['mode_counts'] else '-'



SHORT = {'teacher': 'teacher', 'teacher_1step': 'teacher\n1 step', 'vdd_moe': 'VDD-MoE\n(ROS)',
         'gaussian_bc': 'Gaussian\nBC', 'em_moe': 'EM-MoE'}


def _short(name: str, m: Mapping[str, Any]) -> str:
    if name == 'teacher' and m.get('sampling_steps'):
        return f'teacher\n{m["sampling_steps"]} steps'
    if name == 'vdd_moe' and not m.get('via_ros'):
        return 'VDD-MoE'
    return SHORT.get(name, name)


def _label(name: str, m: Mapping[str, Any]) -> str:
    label = m.get('label', name)
    if name == 'teacher' and m.get('sampling_steps'):
        label += f', {m["sampling_steps"]} steps'
    return label


def results_table(metrics: Mapping[str, Any]) -> str:
    """The policies side by side as a Markdown table."""
    head = ('| policy | success | modes (successful rollouts) | mode entropy | mean length | '
            'per-action latency p50 / p99 (ms) | speed-up vs teacher | control-step act() '
            'p50 / p99 (ms) |')
    lines = [head, '|' + '---|' * 8]
    for name, m in metrics['policies'].items():
        speed = m.get('speedup_vs_teacher')
        lines.append(
            f"| {_label(name, m)} | {m['success_rate']:.2f} ({m['successes']}/{m['episodes']})"
            f" | {_modes(m)} | {_entropy(m)} | {m['mean_length']:.1f} | "
            f"{_fmt(m.get('query_ms_p50'))} / {_fmt(m.get('query_ms_p99'))} | "
            f"{_fmt(speed, '.1f')}x | {_fmt(m['latency_ms_p50'])} / "
            f"{_fmt(m['latency_ms_p99'])} |")
    return '\n'.join(lines)


def targets_table(metrics: Mapping[str, Any]) -> str:
    lines = ['| target | value | required | status |', '|---|---|---|---|']
    for t in metrics['targets']:
        unit = 'x' if t['name'] == 'latency' else ''
        lines.append(f"| {t['description']} | {_fmt(t['value'])}{unit} | "
                     f">= {_fmt(t['required'])}{unit} | {'met' if t['met'] else 'MISSED'} |")
    beats = metrics['beats_baselines']
    if 'dataset_run' in metrics:
        lines.append('| VDD-MoE mode entropy | - | - | no modes defined |')
        lines.append(f"| VDD-MoE success above Gaussian BC and EM-MoE | "
                     f"{'yes' if beats else 'no'} | - | {'yes' if beats else 'no'} |")
    else:
        lines.append(f"| VDD-MoE success above Gaussian BC and EM-MoE (counts toward the "
                     f"cross-task target: >= {CROSS_TASK_WINS} of {ALL_TASKS} tasks) | "
                     f"{'yes' if beats else 'no'} | yes | "
                     f"{'met' if beats else 'not on this task'} |")
    return '\n'.join(lines)


def render_markdown(metrics: Mapping[str, Any]) -> str:
    """report.md of one task."""
    task = metrics['task']
    s = metrics['settings']
    p = metrics['policies']
    seeds = s['eval_seeds']
    vdd = p['vdd_moe']
    ds = s['dataset']
    ds_modes = ', '.join(f'{k} {v}' for k, v in (ds.get('mode_counts') or {}).items())
    stage_rows = '\n'.join(
        f"| {name} | {_fmt(v['wall_s'], '.1f')} | {v['finished'] or '-'} |"
        for name, v in metrics['stages'].items())
    total = sum(v['wall_s'] or 0.0 for v in metrics['stages'].values())
    config_yaml = yaml.safe_dump(s['config'], sort_keys=False).rstrip()
    train_yaml = yaml.safe_dump(s['train'], sort_keys=False).rstrip()
    n = p['teacher']['episodes']
    verdict = 'all per-task targets met' if metrics['targets_met'] else \
        'some per-task targets MISSED'
    via = ' --via-bags' if metrics.get('via_bags') else ''
    notes = '\n'.join('- ' + line for line in (
        f"*Per-action latency*: one policy query per action (no action chunk amortises it), "
        f"batch 1, one CPU thread, on the demonstrations' observations "
        f"({p['teacher'].get('query_count', '?')} timed queries per policy); the speed-up "
        f"divides the teacher's p50 by each policy's.",
        f"*Control-step act()*: what the rollout runner measured per control step, where the "
        f"policy executes {s['train'].get('action_exec', '?')} actions of each predicted chunk "
        f"before querying again" + ("; for the VDD-MoE, the policy node's inference time."
                                    if vdd.get('via_ros') else '.'),
        f"The VDD-MoE ran through the ROS nodes (sim_node in lockstep, policy_node at "
        f"{_fmt(vdd.get('control_rate_hz'), '.0f')} Hz, over DDS): observation to action "
        f"p50 {_fmt(vdd.get('obs_to_action_ms_p50'))} ms, "
        f"p99 {_fmt(vdd.get('obs_to_action_ms_p99'))} ms." if vdd.get('via_ros') else
        "Every policy ran in process in the dataset's robosuite environment."))
    run = metrics.get('dataset_run')
    if run:
        ds_line = (f"Dataset: {run['source']} ({ds.get('demos')} demonstrations: "
                   f"{run['train']} train, {run['valid']} valid"
                   f"{', filter key ' + run['filter_key'] if run.get('filter_key') else ''}), "
                   f"mean length {_fmt(ds.get('mean_length'), '.1f')} steps; observation keys "
                   f"{', '.join(run['obs_keys'])}; episodes of {run['horizon']} steps.")
        header = (f"Environment: robosuite {run['environment']}, rebuilt from the dataset's "
                  f"env_args; success from its own check; no behaviour modes defined.\n"
                  f"Generated {metrics['generated']} by `vdd-ros pipeline --dataset "
                  f"{run['source']}`: **{verdict}**.")
        entropy_note = 'No behaviour modes are defined for this environment.'
    else:
        from vdd_ros.sim.tasks import get_task
        spec = get_task(task)
        ds_line = (f"Dataset: {ds.get('demos')} scripted demonstrations ({ds_modes}), mean "
                   f"length {_fmt(ds.get('mean_length'), '.1f')} steps, from "
                   f"{ds.get('attempts')} episodes on collection seeds {ds.get('first_seed')} "
                   "onwards.")
        header = (f"Task: {spec.description} (robosuite {spec.env_name}, Panda arm; modes: "
                  f"{', '.join(spec.modes)}).\nGenerated {metrics['generated']} by `vdd-ros "
                  f"pipeline --task {task}{via}`: **{verdict}**.")
        entropy_note = (f"Mode shares count successful rollouts; mode entropy is -sum p log p "
                        f"/ log {len(spec.modes)}.")
    settings = '\n'.join('- ' + line for line in (
        ds_line,
        f"Evaluation seeds: {_seed_range(seeds)} ({len(seeds)} per policy).",
        f"Teacher sampling steps: {p['teacher'].get('sampling_steps', '?')} (its default) and "
        f"1; VDD-MoE expert choice: {vdd.get('expert_mode', '?')}."))
    return f"""# VDD-MoE on `{task}`

{header}
{via_bags_section(metrics)}
## Results

{n} closed-loop rollouts per policy on the same evaluation seeds ({_seed_range(seeds)}).
{entropy_note}

{results_table(metrics)}

{notes}

## Targets

{targets_table(metrics)}

## Plots

![success and mode entropy]({PLOTS['success_entropy']})

![per-action latency]({PLOTS['latency']})

![training curves]({PLOTS['training_curves']})

VDD-MoE rollouts{'' if run else ' of each mode'}: ![VDD-MoE rollouts](vdd_moe_modes.gif)

## Settings

{settings}

Pipeline config:

```yaml
{config_yaml}
```

<details><summary>Training config (resolved)</summary>

```yaml
{train_yaml}
```

</details>

## Wall time per stage

| stage | wall time (s) | finished |
|---|---|---|
{stage_rows}
| total | {total:.1f} | |
"""


def via_bags_section(metrics: Mapping[str, Any]) -> str:
    """The via-bags note and the native-vs-via-bags table ('' for a native run)."""
    vb = metrics.get('via_bags')
    if not vb:
        return ''
    lines = ['| policy | native success | via-bags success | difference | same outcome '
             '(seeds) |', '|---|---|---|---|---|']
    for r in vb['rows']:
        label = metrics['policies'][r['policy']].get('label', r['policy'])
        mine = f"{r['via_bags']:.2f} ({r['via_bags_successes']}/{r['episodes']})"
        if r.get('native') is None:
            lines.append(f'| {label} | no native results | {mine} | - | - |')
            continue
        native = f"{r['native']:.2f} ({r['native_successes']}/{r['native_episodes']})"
        same = f"{r['same_outcome']}/{r['episodes']}" + ('' if r['same_seeds'] else
                                                          ' (different seeds!)')
        lines.append(f"| {label} | {native} | {mine} | {r['difference']:+.2f} | {same} |")
    table = '\n'.join(lines)
    return f"""
## Via bags

Everything ran over standard ROS 2 messages through the task's binding
(`{vb['binding']}`): the scripted demonstrator drove sim_node through its command topics
(TwistStamped, Float64MultiArray) while `vdd-ros record` recorded JointState, PoseStamped,
/clock and the episode markers into rosbag2 (MCAP); `vdd-ros bag2dataset` made the training
dataset from the bags; the teacher and the VDD-MoE were evaluated through sim_node and
policy_node over the same binding (lockstep, act_on complete, sim time), the other policies
in-process. Against the native pipeline ({vb['native_folder']}), on the same evaluation seeds:

{table}
"""


def _seed_range(seeds: list[int]) -> str:
    if not seeds:
        return '-'
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f'{seeds[0]}..{seeds[-1]}'
    return ', '.join(map(str, seeds))


# -- plots ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format='png')


def plot_success_entropy(metrics: Mapping[str, Any], path: Path) -> None:
    """Success rate, mode shares and mode entropy per policy, with the VDD-MoE targets."""
    plt = _pyplot()
    p = metrics['policies']
    names = list(p)
    labels = [_short(n, p[n]) for n in names]
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = ['tab:green' if n == 'vdd_moe' else 'tab:grey' for n in names]
    axes[0].bar(x, [p[n]['success_rate'] for n in names], color=colours)
    for i, n in enumerate(names):
        axes[0].annotate(f"{p[n]['success_rate']:.2f}", (i, p[n]['success_rate']),
                         textcoords='offset points', xytext=(0, 2), ha='center', fontsize=8)
    axes[0].axhline(0.85, ls='--', c='tab:red', lw=1, label='target 0.85')
    axes[0].axhline(p['teacher']['success_rate'] - 0.05, ls=':', c='tab:blue', lw=1,
                    label="teacher's - 0.05")
    axes[0].set_title('success rate')
    modes = list(p['teacher']['mode_counts'])
    bottom = [0.0] * len(names)
    for mode in modes:
        share = [p[n]['mode_counts'].get(mode, 0) / p[n]['episodes'] for n in names]
        axes[1].bar(x, share, bottom=bottom, label=mode)
        bottom = [b + s for b, s in zip(bottom, share)]
    axes[1].set_title('rollouts per mode (successful, share of all)')
    axes[2].set_title('normalised mode entropy')
    if modes:
        axes[2].bar(x, [p[n]['mode_entropy'] for n in names], color=colours)
        for i, n in enumerate(names):
            axes[2].annotate(f"{p[n]['mode_entropy']:.2f}", (i, p[n]['mode_entropy']),
                             textcoords='offset points', xytext=(0, 2), ha='center',
                             fontsize=8)
        axes[2].axhline(0.8 * p['teacher']['mode_entropy'], ls='--', c='tab:red', lw=1,
                        label="0.8 x teacher's")
    if not modes:
        for ax in axes[1:]:
            ax.text(0.5, 0.5, 'no modes defined', ha='center', transform=ax.transAxes)
    for ax in axes:
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylim(0, 1.12)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc='upper right')
    fig.suptitle(f"{metrics['task']}: {p['teacher']['episodes']} rollouts per policy")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_latency(metrics: Mapping[str, Any], path: Path) -> None:
    """Per-action latency (p50 bars, p99 whiskers) per policy, log scale."""
    plt = _pyplot()
    p = metrics['policies']
    names = list(p)
    p50 = [p[n]['query_ms_p50'] for n in names]
    p99 = [p[n]['query_ms_p99'] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = list(range(len(names)))
    ax.bar(x, p50, color=['tab:green' if n == 'vdd_moe' else 'tab:grey' for n in names])
    ax.errorbar(x, p50, yerr=[[0] * len(x), [max(b - a, 0) for a, b in zip(p50, p99)]],
                fmt='none', ecolor='k', capsize=4, lw=1)
    for i, n in enumerate(names):
        speed = p[n].get('speedup_vs_teacher')
        ax.annotate(f'{p50[i]:.3f} ms\n{speed:.1f}x' if speed else f'{p50[i]:.3f} ms',
                    (i, max(p50[i], p99[i])), textcoords='offset points', xytext=(0, 3),
                    ha='center', fontsize=7)
    ax.axhline(p['teacher']['query_ms_p50'] / 8, ls='--', c='tab:red', lw=1,
               label="target: teacher's / 8")
    ax.set_yscale('log')
    positive = [v for v in p50 + p99 if v > 0] or [1.0]
    ax.set_ylim(min(positive) / 3, max(positive) * 3)
    ax.legend(fontsize=7, loc='upper right')
    ax.set_xticks(x, [_short(n, p[n]) for n in names], fontsize=8)
    ax.set_ylabel('ms per action (p50, whisker to p99)')
    ax.set_title(f"{metrics['task']}: per-action latency, batch 1, one thread "
                 f"(speed-up vs the teacher)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_training_curves(metrics: Mapping[str, Any], path: Path) -> None:
    """Loss against iteration for each trained model."""
    plt = _pyplot()
    titles = {'teacher': 'diffusion teacher (denoising loss)',
              'vdd_moe': 'VDD-MoE (distillation bound)', 'gaussian_bc': 'Gaussian BC (NLL)',
              'em_moe': 'EM-trained MoE (NLL)'}
    fig, axes = plt.subplots(1, len(TRAINED), figsize=(4 * len(TRAINED), 3.4))
    for ax, name in zip(axes, TRAINED):
        history = metrics['training'][name]['loss_history']
        if history:
            it = [h[0] for h in history]
            loss = [h[1] for h in history]
            ax.plot(it, loss, lw=1)
            if name == 'teacher' and min(loss) > 0:
                ax.set_yscale('log')
        ax.set_title(titles[name], fontsize=9)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics['task']}: training curves", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def render_task_report(folder: str | os.PathLike) -> Path:
    """report.md and the plots of a task folder, from its metrics.json."""
    folder = Path(folder)
    metrics = _read_json(folder / 'metrics.json')
    plot_success_entropy(metrics, folder / PLOTS['success_entropy'])
    plot_latency(metrics, folder / PLOTS['latency'])
    plot_training_curves(metrics, folder / PLOTS['training_curves'])
    return write_text(folder / 'report.md', render_markdown(metrics))


# -- console and cross-task summary -----------------------------------------------------------
def format_summary(metrics: Mapping[str, Any]) -> str:
    """The results and targets of one task as aligned console text."""
    rows = [('policy', 'success', 'entropy', 'ms/action', 'speed-up')]
    for name, m in metrics['policies'].items():
        speed = m.get('speedup_vs_teacher')
        entropy = f"{m['mode_entropy']:.2f}" if m['mode_counts'] else 'no modes'
        rows.append((_label(name, m), f"{m['success_rate']:.2f}", entropy,
                     f"{m['query_ms_p50']:.3f}", f'{speed:.1f}x' if speed else '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"results on {metrics['task']}:"]
    lines += ['  ' + '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append('targets:')
    for t in metrics['targets']:
        lines.append(f"  {'met   ' if t['met'] else 'MISSED'}  {t['description']}: "
                     f"{t['value']:.3f} (required >= {t['required']:.3f})")
    lines.append(f"  VDD-MoE above both baselines on success: "
                 f"{'yes' if metrics['beats_baselines'] else 'no'}")
    return '\n'.join(lines)


def task_metrics(results: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """metrics.json of every task folder under `results` that has one, by task name."""
    out = {}
    root = Path(results)
    for path in sorted(root.glob('*/metrics.json')):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and 'policies' in data and 'dataset_run' not in data:
            out[path.parent.name] = data   # (runs on users' datasets are not tasks)
    return out


def summary_markdown(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """results/summary.md: success per policy and task, per-task targets, cross-task target."""
    header = '| task | ' + ' | '.join(POLICY_ORDER) + ' | per-task targets | VDD-MoE above ' \
        'both baselines |'
    lines = [header, '|' + '---|' * (len(POLICY_ORDER) + 3)]
    wins = 0
    for task, m in tasks.items():
        p = m['policies']
        cells = [f"{p[n]['success_rate']:.2f}" if n in p else '-' for n in POLICY_ORDER]
        missed = [t['name'] for t in m['targets'] if not t['met']]
        wins += bool(m['beats_baselines'])
        lines.append(f"| [{task}]({task}/report.md) | " + ' | '.join(cells) +
                     f" | {'met' if not missed else 'MISSED: ' + ', '.join(missed)} | "
                     f"{'yes' if m['beats_baselines'] else 'no'} |")
    status = cross_task_status(tasks)
    return f"""# VDD-MoE across tasks

Generated {_now()} from the task folders present. Success rates on each task's evaluation
seeds; the VDD-MoE ran through the ROS nodes.

{chr(10).join(lines)}

Cross-task target: the VDD-MoE beats Gaussian BC and the EM-trained MoE on success on >=
{CROSS_TASK_WINS} of {ALL_TASKS} tasks: **{status}** ({wins} of {len(tasks)} evaluated).
"""


def cross_task_status(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """'met', 'MISSED', or 'pending' while too few tasks have results to decide."""
    wins = sum(bool(m['beats_baselines']) for m in tasks.values())
    if wins >= CROSS_TASK_WINS:
        return 'met'
    if wins + (ALL_TASKS - len(tasks)) >= CROSS_TASK_WINS:
        return 'pending'
    return 'MISSED'


def write_summary(results: str | os.PathLike) -> Path | None:
    """Write results/summary.md from the task folders present (None when there are none)."""
    tasks = task_metrics(results)
    if not tasks:
        return None
    return write_text(Path(results) / 'summary.md', summary_markdown(tasks))
