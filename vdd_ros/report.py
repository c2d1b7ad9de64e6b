"""Results of a pipeline run: metrics.json, report.md, plots, and a summary across tasks.

`assemble_metrics` gathers a task folder's evaluations (every training seed), stage markers
and loss histories into one dict (written as metrics.json); `render_task_report` writes
report.md and the plots from metrics.json alone, so `vdd-ros report` can redraw them;
`write_summary` tabulates every task folder that has a metrics.json and checks the cross-task
targets. Policies, labels and curves come from the registry (vdd_ros/policies.py).

Intervals are 95% percentile intervals of a two-level bootstrap: resample the training seeds,
then each resampled seed's rollouts (`interval_summary`); with one seed, over rollouts only.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from vdd_ros.core.io import atomic_path, write_text
from vdd_ros.errors import UserError
from vdd_ros.policies import (BASELINES, EVALUATIONS, POLICY_KINDS, STUDENT, TEACHER,
                              evaluations)

CONSISTENCY = 'consistency'
PLOTS = {
    'success_entropy': 'plots/success_entropy.png',
    'latency': 'plots/latency.png',
    'latency_success': 'plots/latency_success.png',
    'training_curves': 'plots/training_curves.png',
}
REPORT_OUTPUTS = ('metrics.json', 'report.md', *PLOTS.values())
# Per-task targets (never loosened): name -> description
TARGETS = {
    'success_vs_teacher': "VDD-MoE success >= teacher's - 0.05",
    'success_floor': 'VDD-MoE success >= 0.85',
    'mode_entropy': "VDD-MoE mode entropy >= 0.85 x teacher's",
    'mode_coverage': 'every mode >= 10% of the VDD-MoE\'s successful rollouts (4+ modes)',
    'latency': "VDD-MoE per-action latency >= 8x lower than the teacher's (default steps)",
}
ENTROPY_FRACTION = 0.85
SUCCESS_MARGIN = 0.05          # VDD-MoE success target: the teacher's minus this
CONSISTENCY_MARGIN = 0.05      # ... and against consistency distillation: its minus this
COVERAGE = 0.10          # least share of each mode, on tasks with at least COVERAGE_MODES
COVERAGE_MODES = 4
CROSS_TASK_WINS = 3      # tasks on which the VDD-MoE must beat every baseline on success
CONSISTENCY_WINS = 3     # tasks on which it must beat consistency distillation on entropy
ALL_TASKS = 4
HISTORY_POINTS = 400     # loss-history points kept per model in metrics.json
BOOTSTRAP = 2000         # bootstrap resamples of an interval
# The fields of one seed's evaluation that metrics.json keeps (episodes_detail stays in eval/)
RUN_FIELDS = ('successes', 'episodes', 'success_rate', 'mode_counts', 'mode_entropy',
              'mean_length', 'query_ms_p50', 'query_ms_p99')
# Fields taken from the first seed's evaluation (the same for every seed)
FIRST_FIELDS = ('label', 'via_ros', 'sampling_steps', 'expert_mode', 'control_rate_hz',
                'workers', 'device', 'query_count', 'query_rounds')
# Fields averaged over the seeds
MEAN_FIELDS = ('mean_length', 'mean_length_success', 'latency_ms_p50', 'latency_ms_p99',
               'latency_ms_mean', 'query_ms_p50', 'query_ms_p99', 'query_ms_mean',
               'encoder_ms_p50',
               'obs_to_action_ms_p50', 'obs_to_action_ms_p99', 'obs_to_action_ms_mean',
               'deadline_miss_rate', 'wall_s')


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds')


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f'{path}: missing (run `vdd-ros pipeline` first)') from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f'{path}: unreadable ({exc})') from None


# -- intervals --------------------------------------------------------------------------------
def _entropies(counts: np.ndarray) -> np.ndarray:
    """Normalised entropy of each row of mode counts `(..., M)` (0 for an empty row)."""
    m = counts.shape[-1]
    if m < 2:
        return np.zeros(counts.shape[:-1])
    total = counts.sum(-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros(counts.shape), where=total > 0)
    logs = np.log(p, out=np.zeros(p.shape), where=p > 0)
    return -(p * logs).sum(-1) / math.log(m)


def _resampled(runs: Sequence[Mapping[str, Any]], modes: Sequence[str],
               rng: np.random.Generator, resamples: int) -> tuple[np.ndarray, np.ndarray]:
    """Each run's success rate and mode entropy over `resamples` resamples of its rollouts,
    both `(runs, resamples)`."""
    index = {m: i for i, m in enumerate(modes)}
    success, entropy = [], []
    for run in runs:
        detail = run['episodes_detail']
        ok = np.array([bool(d['success']) for d in detail])
        mode = np.array([index.get(d['mode'], -1) for d in detail])
        picks = rng.integers(0, len(detail), (resamples, len(detail)))
        won = ok[picks]
        success.append(won.mean(-1))
        counts = np.stack([(won & (mode[picks] == i)).sum(-1) for i in range(len(modes))],
                          -1) if modes else np.zeros((resamples, 0))
        entropy.append(_entropies(counts))
    return np.stack(success), np.stack(entropy)


def _seed_means(values: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The mean over the resampled seeds `pick (resamples, k)` of per-run resamples
    `values (k, resamples)`."""
    return values[pick, np.arange(pick.shape[0])[:, None]].mean(-1)


def interval_summary(runs: Sequence[Mapping[str, Any]], modes: Sequence[str],
                     resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Mean success rate and mode entropy over evaluations `runs` (one per training seed,
    each with `episodes_detail`), with 95% two-level bootstrap intervals.

    Mode entropy is that of each run's successful rollouts, normalised by log M, averaged
    over runs (None when the task defines no modes).
    """
    rng = np.random.default_rng(seed)
    success, entropy = _resampled(runs, modes, rng, resamples)
    pick = rng.integers(0, len(runs), (resamples, len(runs)))
    boot_s, boot_e = _seed_means(success, pick), _seed_means(entropy, pick)
    rates = [float(r['success_rate']) for r in runs]
    out: dict[str, Any] = {
        'success_rate': float(np.mean(rates)),
        'success_ci': [float(v) for v in np.percentile(boot_s, [2.5, 97.5])],
        'mode_entropy': None, 'entropy_ci': None}
    if modes:
        out['mode_entropy'] = float(np.mean([r['mode_entropy'] for r in runs]))
        out['entropy_ci'] = [float(v) for v in np.percentile(boot_e, [2.5, 97.5])]
    return out


def entropy_difference(runs: Sequence[Mapping[str, Any]], others: Sequence[Mapping[str, Any]],
                       modes: Sequence[str], resamples: int = BOOTSTRAP, seed: int = 0
                       ) -> dict[str, Any]:
    """Mean mode entropy of `runs` minus that of `others` (the same training seeds, in the
    same order), with a 95% interval: the two-level bootstrap of `interval_summary`, the
    training seeds resampled together for both (paired), the rollouts of each separately."""
    if len(runs) != len(others):
        raise ValueError(f'paired runs: {len(runs)} against {len(others)}')
    rng = np.random.default_rng(seed)
    _, mine = _resampled(runs, modes, rng, resamples)
    _, theirs = _resampled(others, modes, rng, resamples)
    pick = rng.integers(0, len(runs), (resamples, len(runs)))
    boot = _seed_means(mine, pick) - _seed_means(theirs, pick)
    value = np.mean([r['mode_entropy'] for r in runs]) - \
        np.mean([r['mode_entropy'] for r in others])
    return {'entropy_difference': float(value),
            'difference_ci': [float(v) for v in np.percentile(boot, [2.5, 97.5])]}


# -- metrics ----------------------------------------------------------------------------------
def aggregate(runs: Sequence[Mapping[str, Any]], seeds: Sequence[int],
              modes: Sequence[str]) -> dict[str, Any]:
    """One policy's figures over its training seeds: means, intervals, pooled mode counts,
    totals and each seed's own figures under `runs`."""
    first = runs[0]
    out: dict[str, Any] = {k: first[k] for k in FIRST_FIELDS if k in first}
    for key in MEAN_FIELDS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
    counts: dict[str, int] = {}
    for r in runs:
        for mode, n in r['mode_counts'].items():
            counts[mode] = counts.get(mode, 0) + int(n)
    out.update(interval_summary(runs, modes),
               successes=sum(int(r['successes']) for r in runs),
               episodes=sum(int(r['episodes']) for r in runs), mode_counts=counts,
               seeds=len(runs),
               runs=[{'seed': s, **{k: r[k] for k in RUN_FIELDS if k in r}}
                     for s, r in zip(seeds, runs)])
    if not modes:
        out['mode_entropy'] = 0.0
    return out


def check_targets(policies: Mapping[str, Mapping[str, Any]],
                  modes: Sequence[str]) -> list[dict[str, Any]]:
    """The per-task targets as rows: name, description, value, required, met. The mode
    targets apply where the task defines modes; mode coverage on tasks with 4+ modes."""
    vdd, teacher = policies[STUDENT], policies[TEACHER]
    speedup = teacher['query_ms_p50'] / max(vdd['query_ms_p50'], 1e-9)
    rows = [
        ('success_vs_teacher', vdd['success_rate'], teacher['success_rate'] - SUCCESS_MARGIN),
        ('success_floor', vdd['success_rate'], 0.85),
        *([('mode_entropy', vdd['mode_entropy'], ENTROPY_FRACTION * teacher['mode_entropy'])]
          if modes else []),
        *([('mode_coverage', min_share(vdd), COVERAGE)]
          if len(modes) >= COVERAGE_MODES else []),
        ('latency', speedup, 8.0),
    ]
    return [{'name': name, 'description': TARGETS[name], 'value': float(value),
             'required': float(required), 'met': bool(value >= required - 1e-12)}
            for name, value, required in rows]


def min_share(m: Mapping[str, Any]) -> float:
    """The smallest share of a mode among the policy's successful rollouts (pooled)."""
    wins = sum(m['mode_counts'].values())
    return min(m['mode_counts'].values()) / wins if wins else 0.0


def beats_baselines(policies: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the VDD-MoE's success rate is above every baseline's."""
    vdd = policies[STUDENT]['success_rate']
    return all(vdd > policies[b]['success_rate'] for b in BASELINES if b in policies)


def versus_consistency(policies: Mapping[str, Mapping[str, Any]],
                       runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                       modes: Sequence[str] = ()) -> dict[str, Any] | None:
    """The VDD-MoE against consistency distillation: higher mode entropy, success within
    0.05 or better (None without a consistency evaluation); with both policies' evaluations
    `runs` (one per training seed), also the entropy difference and its interval."""
    if CONSISTENCY not in policies:
        return None
    vdd, cd = policies[STUDENT], policies[CONSISTENCY]
    entropy = vdd['mode_entropy'] > cd['mode_entropy']
    success = vdd['success_rate'] >= cd['success_rate'] - CONSISTENCY_MARGIN
    out = {'entropy': bool(entropy), 'success': bool(success), 'met': bool(entropy and success)}
    if runs is not None:
        out.update(entropy_difference(runs[STUDENT], runs[CONSISTENCY], modes))
    return out


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
                     train: Mapping[str, Any], stage_order: list[str] | None = None,
                     seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """metrics.json of a task folder whose evaluations are done (stages in `stage_order`,
    training seeds `seeds`, each in seed_<s>/: its evaluations in eval/, its policies'
    per-action latency in latency.json)."""
    from vdd_ros.core.checkpoint import read_training
    folder = Path(folder)
    imported = _read_json(folder / 'stages' / 'dataset.json') \
        if (folder / 'stages' / 'dataset.json').is_file() else None
    modes: list[str] = []
    if imported is None:
        from vdd_ros.sim.tasks import get_task
        modes = list(get_task(folder.name).modes)
    policies: dict[str, dict[str, Any]] = {}
    evaluations: dict[str, list[dict[str, Any]]] = {}
    eval_seeds: list[int] = []
    trained = config.get('policies') or list(POLICY_KINDS)
    latency = {s: _read_json(folder / f'seed_{s}' / 'latency.json') for s in seeds}
    for name, (_, kind) in EVALUATIONS.items():
        if kind.name not in trained:
            continue
        runs = [{**_read_json(folder / f'seed_{s}' / 'eval' / f'{name}.json'),
                 **latency[s]['policies'][name], 'query_rounds': latency[s]['rounds']}
                for s in seeds]
        policies[name] = aggregate(runs, seeds, modes)
        evaluations[name] = runs
        eval_seeds = [d['seed'] for d in runs[0].get('episodes_detail', [])]
    teacher_ms = policies[TEACHER]['query_ms_p50']
    for m in policies.values():
        m['speedup_vs_teacher'] = teacher_ms / m['query_ms_p50'] if m['query_ms_p50'] > 0 \
            else None
    targets = check_targets(policies, modes)
    versus = versus_consistency(policies, evaluations, modes) if modes else None
    stages = {}
    order = {name: i for i, name in enumerate(stage_order or [])}
    markers = sorted((folder / 'stages').rglob('*.json'),
                     key=lambda path: (order.get(_stage_name(folder, path), len(order)),
                                       str(path)))
    for marker in markers:
        data = _read_json(marker)
        if data.get('stage', '').startswith('tune/'):
            continue
        stages[data['stage']] = {'wall_s': data.get('wall_s'), 'finished': data.get('finished'),
                                 'info': data.get('info', {})}
    training = {}
    for kind in trained:
        curves = [read_training(folder / f'seed_{s}' / kind) for s in seeds]
        training[kind] = {'iterations': curves[0]['iterations'],
                          'loss_history': _downsample(curves[0]['loss_history']),
                          'seed_histories': [_downsample(c['loss_history'], 100)
                                             for c in curves[1:]]}
    data_stage = next((stages[n] for n in ('collect', 'bag2dataset', 'dataset') if n in stages),
                      {})
    collect = data_stage.get('info', {})
    return {
        'task': folder.name,
        **({'dataset_run': {**imported['info'], 'source': imported['settings']['path'],
                            'filter_key': imported['settings'].get('filter_key')}}
           if imported else {}),
        'generated': _now(),
        'modes': modes,
        'training_seeds': list(seeds),
        'policies': policies,
        'targets': targets,
        'targets_met': all(t['met'] for t in targets),
        'beats_baselines': beats_baselines(policies),
        'versus_consistency': versus,
        'settings': {
            'config': dict(config), 'train': dict(train),
            'dataset': {'demos': collect.get('kept'), 'mode_counts': collect.get('mode_counts'),
                        'mean_length': collect.get('mean_length'),
                        'attempts': collect.get('attempts'),
                        'first_seed': config.get('collect_seed')},
            'eval_seeds': eval_seeds,
        },
        'stages': {k: {'wall_s': v['wall_s'], 'finished': v['finished']}
                   for k, v in stages.items()},
        'training': training,
    }


def _stage_name(folder: Path, marker: Path) -> str:
    return str(marker.relative_to(folder / 'stages').with_suffix(''))


# -- report.md --------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = '.3f') -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '-'
    return format(value, spec)


def _ci(value: float | None, ci: Sequence[float] | None, spec: str = '.2f') -> str:
    """`0.94 [0.86, 1.00]`."""
    if value is None:
        return '-'
    if ci is None:
        return format(value, spec)
    return f'{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]'


def _modes(m: Mapping[str, Any]) -> str:
    wins = m['successes']
    return ', '.join(f'{k} {v} ({v / wins:.0%})' if wins else f'{k} 0'
                     for k, v in m['mode_counts'].items()) or 'no modes defined'


def _entropy(m: Mapping[str, Any]) -> str:
    return _ci(m['mode_entropy'], m.get('entropy_ci'), '.3f') if m['mode_counts'] else '-'


def _per_seed(m: Mapping[str, Any]) -> str:
    runs = m.get('runs') or []
    return ', '.join(f"{r['successes']}/{r['episodes']}" for r in runs) or '-'


def _short(name: str, m: Mapping[str, Any]) -> str:
    if name == TEACHER and m.get('sampling_steps'):
        return f'teacher\n{m["sampling_steps"]} steps'
    short = EVALUATIONS[name][0].short if name in EVALUATIONS else name
    return short + ('\n(ROS)' if m.get('via_ros') else '')


def _label(name: str, m: Mapping[str, Any]) -> str:
    label = m.get('label', name)
    if name == TEACHER and m.get('sampling_steps'):
        label += f', {m["sampling_steps"]} steps'
    return label


def results_table(metrics: Mapping[str, Any]) -> str:
    """The policies side by side as a Markdown table (means over the training seeds)."""
    head = ('| policy | success [95% CI] | successes per seed | modes (successful rollouts) | '
            'mode entropy [95% CI] | mean length | per-action latency p50 / p99 (ms) | '
            'speed-up vs teacher | control-step act() p50 / p99 (ms) |')
    lines = [head, '|' + '---|' * 9]
    for name, m in metrics['policies'].items():
        speed = m.get('speedup_vs_teacher')
        lines.append(
            f"| {_label(name, m)} | {_ci(m['success_rate'], m.get('success_ci'))} | "
            f"{_per_seed(m)} | {_modes(m)} | {_entropy(m)} | {m['mean_length']:.1f} | "
            f"{_fmt(m.get('query_ms_p50'))} / {_fmt(m.get('query_ms_p99'))} | "
            f"{_fmt(speed, '.1f')}x | {_fmt(m.get('latency_ms_p50'))} / "
            f"{_fmt(m.get('latency_ms_p99'))} |")
    return '\n'.join(lines)


def difference_text(vs: Mapping[str, Any]) -> str:
    """'+0.012 [-0.030, +0.051]': the VDD-MoE's mode entropy minus consistency
    distillation's, with its interval ('' without one)."""
    if vs.get('difference_ci') is None:
        return ''
    lo, hi = vs['difference_ci']
    return f"{vs['entropy_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def targets_table(metrics: Mapping[str, Any]) -> str:
    lines = ['| target | value | required | status |', '|---|---|---|---|']
    for t in metrics['targets']:
        unit = 'x' if t['name'] == 'latency' else ''
        lines.append(f"| {t['description']} | {_fmt(t['value'])}{unit} | "
                     f">= {_fmt(t['required'])}{unit} | {'met' if t['met'] else 'MISSED'} |")
    beats = metrics['beats_baselines']
    if 'dataset_run' in metrics:
        lines.append('| VDD-MoE mode entropy | - | - | no modes defined |')
        lines.append(f"| VDD-MoE success above every baseline | "
                     f"{'yes' if beats else 'no'} | - | {'yes' if beats else 'no'} |")
        return '\n'.join(lines)
    lines.append(f"| VDD-MoE success above every baseline (counts toward the cross-task "
                 f"target: >= {CROSS_TASK_WINS} of {ALL_TASKS} tasks) | "
                 f"{'yes' if beats else 'no'} | yes | {'met' if beats else 'not on this task'} |")
    vs = metrics.get('versus_consistency')
    if vs:
        lines.append(f"| VDD-MoE mode entropy above consistency distillation's, success "
                     f"within {CONSISTENCY_MARGIN} or better (cross-task: >= "
                     f"{CONSISTENCY_WINS} of {ALL_TASKS} tasks) | entropy "
                     f"{'higher' if vs['entropy'] else 'not higher'}"
                     + (f" ({difference_text(vs)})" if vs.get('difference_ci') else '') +
                     f", success {'within' if vs['success'] else 'not within'} | both | "
                     f"{'met' if vs['met'] else 'not on this task'} |")
    return '\n'.join(lines)


def render_markdown(metrics: Mapping[str, Any]) -> str:
    """report.md of one task."""
    task = metrics['task']
    s = metrics['settings']
    p = metrics['policies']
    seeds = s['eval_seeds']
    training_seeds = metrics.get('training_seeds') or [s['train'].get('seed', 0)]
    vdd = p[STUDENT]
    ds = s['dataset']
    ds_modes = ', '.join(f'{k} {v}' for k, v in (ds.get('mode_counts') or {}).items())
    stage_rows = '\n'.join(
        f"| {name} | {_fmt(v['wall_s'], '.1f')} | {v['finished'] or '-'} |"
        for name, v in metrics['stages'].items())
    total = sum(v['wall_s'] or 0.0 for v in metrics['stages'].values())
    config_yaml = yaml.safe_dump(s['config'], sort_keys=False).rstrip()
    train_yaml = yaml.safe_dump(s['train'], sort_keys=False).rstrip()
    n = len(seeds)
    verdict = 'all per-task targets met' if metrics['targets_met'] else \
        'some per-task targets MISSED'
    via = ' --via-bags' if metrics.get('via_bags') else ''
    notes = '\n'.join('- ' + line for line in (
        f"*Intervals*: 95% percentile intervals of a two-level bootstrap ({BOOTSTRAP} "
        f"resamples: the training seeds, then each seed's rollouts); with one training seed, "
        f"over the rollouts only.",
        f"*Per-action latency*: one policy query per action (no action chunk amortises it), "
        f"batch 1, one CPU thread, on the demonstrations' observations "
        f"({p[TEACHER].get('query_count', '?')} timed queries per policy, after the "
        f"evaluations, every policy of a seed timed in turn over "
        f"{p[TEACHER].get('query_rounds', '?')} rounds so that the "
        f"machine's load falls on all alike), mean over the seeds; the speed-up divides the "
        f"teacher's p50 by each policy's." + (
            f" The image encoders alone take {_fmt(vdd['encoder_ms_p50'])} ms of the VDD-MoE's "
            f"{_fmt(vdd['query_ms_p50'])} ms "
            f"({100 * vdd['encoder_ms_p50'] / vdd['query_ms_p50']:.0f}%) and "
            f"{_fmt(p[TEACHER].get('encoder_ms_p50'))} ms of the teacher's "
            f"{_fmt(p[TEACHER]['query_ms_p50'])} ms (each encodes a window's frames once per "
            f"query)." if vdd.get('encoder_ms_p50') else ''),
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
        entropy_note = (f"Mode shares count successful rollouts (pooled over the seeds); mode "
                        f"entropy is -sum p log p / log {len(spec.modes)} per seed, averaged.")
    settings = '\n'.join('- ' + line for line in (
        ds_line,
        f"Test seeds: {_seed_range(seeds)} ({n} per policy and training seed); no setting was "
        f"chosen on them (settings come from `vdd-ros tune`, on validation seeds from "
        f"2000000).",
        f"Training seeds: {', '.join(map(str, training_seeds))}; every policy is trained "
        f"once per seed on the same demonstrations.",
        f"Teacher sampling steps: {p[TEACHER].get('sampling_steps', '?')} (its default), 4, 2 "
        f"and 1; VDD-MoE expert choice: {vdd.get('expert_mode', '?')}."))
    return f"""# VDD-MoE on `{task}`

{header}
{via_bags_section(metrics)}
## Results

{n} closed-loop rollouts per policy and training seed, on the same test seeds
({_seed_range(seeds)}); {len(training_seeds)} training seed(s). {entropy_note}

{results_table(metrics)}

{notes}

## Targets

{targets_table(metrics)}

## Plots

![success and mode entropy]({PLOTS['success_entropy']})

![latency against success]({PLOTS['latency_success']})

![per-action latency]({PLOTS['latency']})

![training curves]({PLOTS['training_curves']})

VDD-MoE rollouts{'' if run else ' of each mode'} (first training seed):
![VDD-MoE rollouts](vdd_moe_modes.gif)

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


def _errors(values: Sequence[float], cis: Sequence[Sequence[float] | None]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars from intervals (0 where there is none)."""
    lo = [v - c[0] if c else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if c else 0.0 for v, c in zip(values, cis)]
    return [[max(x, 0.0) for x in lo], [max(x, 0.0) for x in hi]]


def _colour(name: str) -> str:
    return 'tab:green' if name == STUDENT else 'tab:orange' if name == CONSISTENCY \
        else 'tab:grey'


def plot_success_entropy(metrics: Mapping[str, Any], path: Path) -> None:
    """Success rate, mode shares and mode entropy per policy (95% intervals as whiskers),
    with the VDD-MoE targets."""
    plt = _pyplot()
    p = metrics['policies']
    names = list(p)
    labels = [_short(n, p[n]) for n in names]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(3 * len(names) + 3, 4.4))
    colours = [_colour(n) for n in names]
    rates = [p[n]['success_rate'] for n in names]
    axes[0].bar(x, rates, color=colours)
    axes[0].errorbar(x, rates, yerr=_errors(rates, [p[n].get('success_ci') for n in names]),
                     fmt='none', ecolor='k', capsize=3, lw=1)
    for i, rate in enumerate(rates):
        axes[0].annotate(f'{rate:.2f}', (i, rate), textcoords='offset points',
                         xytext=(6, 2), ha='left', fontsize=7)
    axes[0].axhline(0.85, ls='--', c='tab:red', lw=1, label='target 0.85')
    axes[0].axhline(p[TEACHER]['success_rate'] - SUCCESS_MARGIN, ls=':', c='tab:blue', lw=1,
                    label="teacher's - 0.05")
    axes[0].set_title('success rate (95% CI)')
    modes = list(p[TEACHER]['mode_counts'])
    bottom = [0.0] * len(names)
    for mode in modes:
        share = [p[n]['mode_counts'].get(mode, 0) / p[n]['episodes'] for n in names]
        axes[1].bar(x, share, bottom=bottom, label=mode)
        bottom = [b + s for b, s in zip(bottom, share)]
    axes[1].set_title('rollouts per mode (successful, share of all)')
    axes[2].set_title('normalised mode entropy (95% CI)')
    if modes:
        ent = [p[n]['mode_entropy'] for n in names]
        axes[2].bar(x, ent, color=colours)
        axes[2].errorbar(x, ent, yerr=_errors(ent, [p[n].get('entropy_ci') for n in names]),
                         fmt='none', ecolor='k', capsize=3, lw=1)
        for i, e in enumerate(ent):
            axes[2].annotate(f'{e:.2f}', (i, e), textcoords='offset points', xytext=(6, 2),
                             ha='left', fontsize=7)
        axes[2].axhline(ENTROPY_FRACTION * p[TEACHER]['mode_entropy'], ls='--', c='tab:red',
                        lw=1, label=f"{ENTROPY_FRACTION} x teacher's")
    else:
        for ax in axes[1:]:
            ax.text(0.5, 0.5, 'no modes defined', ha='center', transform=ax.transAxes)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0, 1.15)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc='upper right')
    seeds = len(metrics.get('training_seeds') or [0])
    fig.suptitle(f"{metrics['task']}: {len(metrics['settings']['eval_seeds'])} rollouts per "
                 f"policy and training seed, {seeds} seed(s)")
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
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4.2))
    x = list(range(len(names)))
    ax.bar(x, p50, color=[_colour(n) for n in names])
    ax.errorbar(x, p50, yerr=[[0] * len(x), [max(b - a, 0) for a, b in zip(p50, p99)]],
                fmt='none', ecolor='k', capsize=4, lw=1)
    for i, n in enumerate(names):
        speed = p[n].get('speedup_vs_teacher')
        ax.annotate(f'{p50[i]:.3f} ms\n{speed:.1f}x' if speed else f'{p50[i]:.3f} ms',
                    (i, max(p50[i], p99[i])), textcoords='offset points', xytext=(0, 3),
                    ha='center', fontsize=7)
    ax.axhline(p[TEACHER]['query_ms_p50'] / 8, ls='--', c='tab:red', lw=1,
               label="target: teacher's / 8")
    ax.set_yscale('log')
    positive = [v for v in p50 + p99 if v > 0] or [1.0]
    ax.set_ylim(min(positive) / 3, max(positive) * 3)
    ax.legend(fontsize=7, loc='upper right')
    ax.set_xticks(x, [_short(n, p[n]) for n in names], fontsize=7)
    ax.set_ylabel('ms per action (p50, whisker to p99)')
    ax.set_title(f"{metrics['task']}: per-action latency, batch 1, one thread "
                 f"(speed-up vs the teacher)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_latency_success(metrics: Mapping[str, Any], path: Path) -> None:
    """Success (95% CI) against per-action latency (log scale), every policy one point."""
    plt = _pyplot()
    p = metrics['policies']
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, m in p.items():
        ms, rate = m['query_ms_p50'], m['success_rate']
        ax.errorbar([ms], [rate], yerr=_errors([rate], [m.get('success_ci')]), fmt='o',
                    color=_colour(name), capsize=3, ms=6)
        ax.annotate(_short(name, m).replace('\n', ' '), (ms, rate), textcoords='offset points',
                    xytext=(5, 4), fontsize=7)
    ax.set_xscale('log')
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel('ms per action (p50, batch 1, one thread)')
    ax.set_ylabel('success rate (95% CI)')
    ax.grid(alpha=0.3)
    ax.set_title(f"{metrics['task']}: success against latency", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_training_curves(metrics: Mapping[str, Any], path: Path) -> None:
    """Loss against iteration for each trained model (further training seeds faint)."""
    plt = _pyplot()
    kinds = [k for k in POLICY_KINDS.values() if k.name in metrics['training']]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.4))
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        curve = metrics['training'][kind.name]
        for history, alpha in [(curve['loss_history'], 1.0)] + \
                [(h, 0.35) for h in curve.get('seed_histories', [])]:
            if history:
                ax.plot([h[0] for h in history], [h[1] for h in history], lw=1, alpha=alpha,
                        color='tab:blue')
        loss = [h[1] for h in curve['loss_history']]
        if kind.role == 'teacher' and loss and min(loss) > 0:
            ax.set_yscale('log')
        ax.set_title(kind.curve_title, fontsize=8)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics['task']}: training curves", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_candidates(result: Mapping[str, Any], path: Path) -> None:
    """`vdd-ros tune`: validation success and mode entropy (95% CI) per candidate, with the
    references (teacher, consistency distillation) as lines."""
    plt = _pyplot()
    rows = result['rows']
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(1.1 * len(rows) + 4, 4))
    for ax, key, ci, title in ((axes[0], 'success_rate', 'success_ci', 'validation success'),
                               (axes[1], 'mode_entropy', 'entropy_ci', 'mode entropy')):
        values = [r[key] or 0.0 for r in rows]
        colours = ['tab:green' if r['candidate'] == result['best'] else 'tab:grey'
                   for r in rows]
        ax.bar(x, values, color=colours)
        ax.errorbar(x, values, yerr=_errors(values, [r[ci] for r in rows]), fmt='none',
                    ecolor='k', capsize=3, lw=1)
        teacher = (result.get('teacher') or {}).get(key)
        if teacher is not None:
            target = (teacher - SUCCESS_MARGIN if key == 'success_rate'
                      else ENTROPY_FRACTION * teacher)
            ax.axhline(teacher, color='tab:blue', lw=1, label='teacher')
            ax.axhline(target, color='tab:red', lw=1, ls='--', label='target')
        consistency = (result.get('consistency') or {}).get(key)
        if consistency is not None:
            ax.axhline(consistency, color=_colour(CONSISTENCY), lw=1, ls=':',
                       label='consistency')
        if teacher is not None or consistency is not None:
            ax.legend(fontsize=7, loc='lower right')
        ax.set_xticks(x, [r['candidate'] for r in rows], rotation=35, ha='right', fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{result['task']}: {title} (95% CI)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def render_task_report(folder: str | os.PathLike) -> Path:
    """report.md and the plots of a task folder, from its metrics.json."""
    folder = Path(folder)
    metrics = _read_json(folder / 'metrics.json')
    plot_success_entropy(metrics, folder / PLOTS['success_entropy'])
    plot_latency(metrics, folder / PLOTS['latency'])
    plot_latency_success(metrics, folder / PLOTS['latency_success'])
    plot_training_curves(metrics, folder / PLOTS['training_curves'])
    return write_text(folder / 'report.md', render_markdown(metrics))


# -- console and cross-task summary -----------------------------------------------------------
def format_summary(metrics: Mapping[str, Any]) -> str:
    """The results and targets of one task as aligned console text."""
    rows = [('policy', 'success [95% CI]', 'entropy', 'ms/action', 'speed-up')]
    for name, m in metrics['policies'].items():
        speed = m.get('speedup_vs_teacher')
        entropy = f"{m['mode_entropy']:.2f}" if m['mode_counts'] else 'no modes'
        rows.append((_label(name, m), _ci(m['success_rate'], m.get('success_ci')), entropy,
                     f"{m['query_ms_p50']:.3f}", f'{speed:.1f}x' if speed else '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    seeds = len(metrics.get('training_seeds') or [0])
    lines = [f"results on {metrics['task']} ({seeds} training seed(s)):"]
    lines += ['  ' + '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append('targets:')
    for t in metrics['targets']:
        lines.append(f"  {'met   ' if t['met'] else 'MISSED'}  {t['description']}: "
                     f"{t['value']:.3f} (required >= {t['required']:.3f})")
    lines.append(f"  VDD-MoE above every baseline on success: "
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
    """results/summary.md: success per policy and task, per-task targets, cross-task targets."""
    names = [e.name for e, _ in evaluations()]
    header = '| task | seeds | ' + ' | '.join(names) + ' | per-task targets | VDD-MoE above ' \
        'every baseline | VDD-MoE vs consistency distillation |'
    lines = [header, '|' + '---|' * (len(names) + 5)]
    for task, m in tasks.items():
        p = m['policies']
        cells = [_ci(p[n]['success_rate'], p[n].get('success_ci')) if n in p else '-'
                 for n in names]
        missed = [t['name'] for t in m['targets'] if not t['met']]
        vs = m.get('versus_consistency')
        lines.append(f"| [{task}]({task}/report.md) | {len(m.get('training_seeds') or [0])} | "
                     + ' | '.join(cells) +
                     f" | {'met' if not missed else 'MISSED: ' + ', '.join(missed)} | "
                     f"{'yes' if m['beats_baselines'] else 'no'} | "
                     f"{'-' if not vs else 'better' if vs['met'] else 'not better'}"
                     + (f" (entropy {difference_text(vs)})" if vs and vs.get('difference_ci')
                        else '')
                     + ' |')
    return f"""# VDD-MoE across tasks

Generated {_now()} from the task folders present. Success rates (mean over the training
seeds, 95% interval) on each task's test seeds; the VDD-MoE ran through the ROS nodes.

{chr(10).join(lines)}

The last column's entropy figure is the VDD-MoE's mode entropy minus consistency
distillation's, with a 95% interval (two-level bootstrap, the training seeds paired).

Cross-task targets:
- the VDD-MoE beats every baseline on success on >= {CROSS_TASK_WINS} of {ALL_TASKS} tasks:
  **{cross_task_status(tasks)}**;
- the VDD-MoE has higher mode entropy than consistency distillation, with success within
  {CONSISTENCY_MARGIN} of it or better, on >= {CONSISTENCY_WINS} of {ALL_TASKS} tasks:
  **{consistency_status(tasks)}**.
"""


def _status(wins: int, decided: int, needed: int) -> str:
    if wins >= needed:
        return 'met'
    if wins + (ALL_TASKS - decided) >= needed:
        return 'pending'
    return 'MISSED'


def _state_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The metrics of the state tasks (the cross-task targets are over these; camera tasks
    have their own figures)."""
    from vdd_ros.sim.tasks import TASKS
    return [m for t, m in tasks.items() if t not in TASKS or not TASKS[t].cameras]


def cross_task_status(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """'met', 'MISSED', or 'pending' while too few tasks have results to decide."""
    state = _state_tasks(tasks)
    wins = sum(bool(m['beats_baselines']) for m in state)
    return _status(wins, len(state), CROSS_TASK_WINS)


def consistency_status(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """The same for the comparison with consistency distillation."""
    rows = [m.get('versus_consistency') for m in _state_tasks(tasks)]
    return _status(sum(bool(r and r['met']) for r in rows), len(rows), CONSISTENCY_WINS)


def write_summary(results: str | os.PathLike) -> Path | None:
    """Write results/summary.md from the task folders present (None when there are none)."""
    tasks = task_metrics(results)
    if not tasks:
        return None
    return write_text(Path(results) / 'summary.md', summary_markdown(tasks))
