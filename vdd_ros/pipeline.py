"""The end-to-end pipeline on one task: demonstrations to a results report.

Stages, in order (each reads the outputs of the stages named in its `deps`):

    collect -> teacher -> vdd_moe -> gaussian_bc -> em_moe
            -> eval_<policy> for teacher, teacher_1step, vdd_moe, gaussian_bc, em_moe
            -> video -> report

Everything goes under `<results>/<task>/`. A stage writes its outputs atomically, then its
marker `stages/<stage>.json` (wall time, outputs, the settings it used, a key and a run id).
A stage is skipped when its marker exists, the marker's key matches and every output exists.
The key hashes the stage's settings and the run ids of the stages it reads, so a stage that
reruns (changed settings, lost output, `force`) makes everything downstream of it rerun too.
A run killed at any moment leaves no marker for the stage it was in, so the next run resumes
there. Robosuite, ROS and matplotlib are imported only by the stages that need them.

On the user's dataset (`dataset`, `vdd-ros pipeline --dataset F.hdf5`): under
`<results>/<file stem>/`, a `dataset` stage imports the file (its observation keys and filter
key applied, its train/valid split kept) in place of `collect`; every policy is evaluated in
process in the robosuite environment the file's `env_args` describe (sim/robosuite_env.py),
for `horizon` control steps (default: the longest demonstration), with success from the
environment's own check and no behaviour modes.

Via bags (`via_bags`, `vdd-ros pipeline --via-bags`): the same job with everything over
standard ROS 2 messages, under `<results>/via_bags/<task>/` (its own summary.md there):

    record -> bag2dataset -> teacher -> ... (as above)

- `record`: sim_node (lockstep, the task's shipped binding config/bindings/<task>.yaml) and
  the scripted demonstrator as policy_node (act_on complete) run on a private ROS domain
  and `vdd-ros record`'s recorder writes what they publish into MCAP bags
  (`bags/round_<k>`), the way teleoperation on a real robot is recorded. Seeds and rounds are
  those of `collect`: `collect_seed` onwards, each round asking for as many episodes as
  demonstrations are still missing, up to 2 x demos + 10 attempts.
- `bag2dataset`: the bags become demos.hdf5 through the binding (failed episodes dropped by
  their end markers), so training reads what the recorder wrote, never the simulator.
- The teacher and the VDD-MoE are evaluated through sim_node and policy_node over the
  binding (JointState / PoseStamped in, TwistStamped / Float64MultiArray out, lockstep, act_on
  complete, sim time); the other policies in-process; the evaluation seeds are the native
  pipeline's. The report says so and, when `<results>/<task>/eval/` of the native pipeline
  exists, puts native and via-bags success side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from vdd_ros.core.config import (TrainConfig, apply_overrides, at_least, check_expert_mode,
                                 from_dict, key_text, positive, read_yaml_mapping, to_dict)
from vdd_ros.core.io import atomic_path, check_writable, package_config, write_json
from vdd_ros.errors import ConfigError, UserError

# Policies evaluated, in report order: name -> (training stage, label)
POLICIES: dict[str, tuple[str, str]] = {
    'teacher': ('teacher', 'diffusion teacher'),
    'teacher_1step': ('teacher', 'diffusion teacher, 1 step'),
    'vdd_moe': ('vdd_moe', 'VDD-MoE (over ROS)'),
    'gaussian_bc': ('gaussian_bc', 'Gaussian BC'),
    'em_moe': ('em_moe', 'EM-trained MoE'),
}
GIF_NAME = 'vdd_moe_modes.gif'


# -- configuration ----------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """Settings of one pipeline run on one task (config/pipeline.yaml, merged per task)."""

    demos: int = 200                     # successful scripted demonstrations to collect
    collect_workers: int = 2
    collect_seed: int = 0                # first collection seed
    eval_episodes: int = 50              # rollouts per policy, on the same evaluation seeds
    eval_workers: int = 2                # in-process evaluations (the ROS one runs one sim)
    ros_control_rate_hz: float = 500.0   # policy_node timer in the lockstep ROS evaluation
    teacher_steps: int | None = None     # teacher's default sampling steps (None: checkpoint's)
    expert_mode: str | int | None = None  # VDD-MoE expert choice (None: checkpoint's)
    video_episodes_per_mode: int = 1     # VDD-MoE episodes rendered per behaviour mode
    latency_queries: int = 300           # timed single-observation queries per policy
    horizon: int | None = None           # --dataset runs: steps per episode (None: longest demo)
    train: dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig overrides

    def validate(self) -> None:
        for name in ('demos', 'collect_workers', 'eval_episodes', 'eval_workers',
                     'video_episodes_per_mode'):
            at_least(getattr(self, name), 1, name)
        at_least(self.collect_seed, 0, 'collect_seed')
        at_least(self.latency_queries, 10, 'latency_queries')
        if self.horizon is not None:
            at_least(self.horizon, 1, 'horizon')
        positive(self.ros_control_rate_hz, 'ros_control_rate_hz')
        if self.teacher_steps is not None:
            at_least(self.teacher_steps, 1, 'teacher_steps')
        if not isinstance(self.train, Mapping):
            raise ConfigError(f'train: expected a mapping of dotted training keys, got '
                              f'{self.train!r}')
        self.train = flatten(self.train)
        train = self.train_config()
        if self.expert_mode is not None:
            check_expert_mode(self.expert_mode, train.moe.num_experts, 'expert_mode')

    def train_config(self) -> TrainConfig:
        """The training config: built-in defaults with `train` applied."""
        try:
            return from_dict(TrainConfig, apply_overrides(to_dict(TrainConfig()),
                                                          self.train), 'train')
        except ConfigError as exc:
            raise ConfigError(str(exc).replace('train: ', 'train.', 1)) from None


def flatten(data: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested mappings as dotted keys: `{'vdd': {'lr': 1}}` -> `{'vdd.lr': 1}`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f'{prefix}{key}'
        if isinstance(value, Mapping):
            out.update(flatten(value, f'{dotted}.'))
        else:
            out[dotted] = value
    return out


def default_config_path() -> Path | None:
    """config/pipeline.yaml of the source tree, else of the installed package's share."""
    return package_config('pipeline.yaml')


def load_pipeline_config(task: str, path: str | os.PathLike | None = None,
                         overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """`defaults`, then `tasks.<task>`, then `overrides` (dotted; `train.<key>` for training).
    A `task` of None (a run on the user's dataset) takes no task section.

    Errors name the file, the section and the field.
    """
    from vdd_ros.sim.tasks import TASKS, get_task
    if task is not None:
        get_task(task)
    path = Path(path) if path is not None else default_config_path()
    if path is None:
        raise UserError('config/pipeline.yaml not found (pass --config)')
    data = read_yaml_mapping(path)
    unknown = sorted((k for k in data if k not in ('defaults', 'tasks')), key=repr)
    if unknown:
        raise ConfigError(f'{path}: {key_text(unknown[0])}: unknown key (known: defaults, '
                          f'tasks)')
    tasks = data.get('tasks') or {}
    if not isinstance(tasks, dict):
        raise ConfigError(f'{path}: tasks: expected a mapping of task names')
    for name in tasks:
        if name not in TASKS:
            raise ConfigError(f'{path}: tasks.{key_text(name)}: unknown task (known: '
                              f'{", ".join(TASKS)})')
    merged: dict[str, Any] = {}
    for section, part in (('defaults', data.get('defaults')),
                          (f'tasks.{task}', tasks.get(task) if task else None),
                          ('--set', overrides)):
        if part is None:
            continue
        if not isinstance(part, Mapping):
            raise ConfigError(f'{path}: {section}: expected a mapping')
        _merge(merged, part, section, path)
    return from_dict(PipelineConfig, merged, f'{path} [{task or "defaults"}]')


def _merge(into: dict[str, Any], part: Mapping[str, Any], section: str, path: Path) -> None:
    """Merge one section: fields replace, `train` entries merge key by key."""
    for key, value in part.items():
        top, _, rest = str(key).partition('.')
        if top == 'train':
            train = into.setdefault('train', {})
            if rest:
                train[rest] = value
            elif isinstance(value, Mapping):
                train.update(flatten(value))
            else:
                raise ConfigError(f'{path}: {section}: train: expected a mapping of dotted '
                                  f'training keys, got {value!r}')
        elif rest:
            raise ConfigError(f'{path}: {section}: {key_text(key)}: {key_text(top)} is not a '
                              f'section')
        else:
            into[key] = value


# -- stages -----------------------------------------------------------------------------------
@dataclass
class Stage:
    """One cached step: `run(ctx)` writes `outputs` (paths relative to the task folder)."""

    name: str
    title: str
    deps: tuple[str, ...]
    outputs: list[str]
    settings: dict[str, Any]
    run: Callable[['Context'], dict[str, Any]]


@dataclass
class Context:
    """What every stage needs: the task, its folder, the settings and where to print."""

    task: str
    folder: Path
    cfg: PipelineConfig
    train: TrainConfig
    device: str = 'cpu'
    show_progress: bool = True
    log: Callable[[str], None] = print
    via_bags: bool = False
    nproc: int = 1                  # training stages on this many torchrun ranks
    dataset: dict[str, Any] | None = None   # a run on the user's dataset: `dataset_source`

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def env(self) -> Any:
        """Where episodes run: the task, or the imported dataset's robosuite environment."""
        if self.dataset is None:
            return self.task
        from vdd_ros.sim.rollout import dataset_env
        return dataset_env(self.path('demos.hdf5'), self.cfg.horizon)


def dataset_source(path: str | os.PathLike, obs_keys: list[str] | None = None,
                   filter_key: str | None = None) -> dict[str, Any]:
    """The `dataset` stage's settings for the user's file (checked now, before any stage:
    readable, keys and filter key present, an environment robosuite can rebuild). Its size
    and modification time are part of them, so an edited file is imported again."""
    from vdd_ros.core.data import load_dataset
    from vdd_ros.sim.robosuite_env import check_env_args
    path = Path(path).resolve()
    data = load_dataset(path, obs_keys, filter_key=filter_key)
    check_env_args(data.env_args, str(path))
    stat = path.stat()
    return {'path': str(path), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
            'obs_keys': [k for k, _ in data.obs_fields], 'filter_key': filter_key}


def _train_settings(train: TrainConfig, *sections: str) -> dict[str, Any]:
    d = to_dict(train)
    return {k: d[k] for k in ('seed', 'obs_horizon', 'action_horizon', 'action_exec',
                              *sections)}


def build_stages(ctx: Context) -> list[Stage]:
    """The stages of a run, in execution order."""
    cfg, train = ctx.cfg, ctx.train
    data = 'bag2dataset' if ctx.via_bags else 'dataset' if ctx.dataset else 'collect'
    collection = {'task': ctx.task, 'demos': cfg.demos, 'seed': cfg.collect_seed}
    if ctx.dataset is not None:
        stages = [Stage('dataset', 'import the dataset', (), ['demos.hdf5'],
                        {**ctx.dataset, 'horizon': cfg.horizon}, _import_dataset)]
    elif ctx.via_bags:
        stages = [
            Stage('record', 'record scripted demonstrations through the ROS nodes', (),
                  ['bags'], {**collection, 'binding': _binding_text(ctx.task)}, _record),
            Stage('bag2dataset', 'convert the bags into a dataset', ('record',),
                  ['demos.hdf5'], {'binding': _binding_text(ctx.task)}, _bag2dataset)]
    else:
        stages = [Stage('collect', 'collect scripted demonstrations', (), ['demos.hdf5'],
                        collection, _collect)]
    stages += [
        Stage('teacher', 'train the diffusion teacher', (data,), ['teacher'],
              _train_settings(train, 'teacher'), functools.partial(_train, 'teacher')),
        Stage('vdd_moe', 'distil the VDD-MoE', (data, 'teacher'), ['vdd_moe'],
              {k: to_dict(train)[k] for k in ('seed', 'moe', 'vdd')},
              functools.partial(_train, 'vdd_moe')),
        Stage('gaussian_bc', 'train the Gaussian BC baseline', (data,), ['gaussian_bc'],
              _train_settings(train, 'moe', 'gaussian_bc'),
              functools.partial(_train, 'gaussian_bc')),
        Stage('em_moe', 'train the EM-trained MoE baseline', (data,), ['em_moe'],
              _train_settings(train, 'moe', 'em_moe'), functools.partial(_train, 'em_moe')),
    ]
    for policy, (source, label) in POLICIES.items():
        label = 'VDD-MoE' if ctx.dataset and policy == 'vdd_moe' else label
        settings: dict[str, Any] = {'episodes': cfg.eval_episodes,
                                    'latency_queries': cfg.latency_queries}
        if policy == 'teacher':
            settings['steps'] = cfg.teacher_steps
        elif policy == 'teacher_1step':
            settings['steps'] = 1
        if policy == 'vdd_moe':
            settings['expert_mode'] = cfg.expert_mode
            if ctx.dataset is None:
                settings.update(via_ros=True, control_rate_hz=cfg.ros_control_rate_hz)
        if ctx.via_bags and policy in VIA_BINDING:
            settings.update(via_ros=True, control_rate_hz=cfg.ros_control_rate_hz,
                            binding=f'task:{ctx.task}')
        stages.append(Stage(f'eval_{policy}', f'evaluate: {label}', (data, source),
                            [f'eval/{policy}.json'], settings,
                            functools.partial(_evaluate, policy)))
    stages.append(Stage('video', 'render VDD-MoE rollouts' + ('' if ctx.dataset else
                                                              ' of each mode'), ('eval_vdd_moe',),
                        [GIF_NAME], {'per_mode': cfg.video_episodes_per_mode,
                                     'expert_mode': cfg.expert_mode}, _video))
    from vdd_ros.report import REPORT_OUTPUTS
    report_settings: dict[str, Any] = {'config': to_dict(cfg)}
    if ctx.via_bags:
        report_settings['native'] = _native_fingerprint(ctx)
    stages.append(Stage('report', 'metrics, report and plots',
                        tuple(s.name for s in stages), list(REPORT_OUTPUTS),
                        report_settings, _report))
    return stages


def _binding_text(task: str) -> str:
    """The task's shipped binding as JSON (a stage setting: an edited binding reruns)."""
    from vdd_ros.binding import binding_for_task
    return binding_for_task(task).to_json()


def _record(ctx: Context) -> dict[str, Any]:
    """Scripted demonstrations recorded through sim_node and policy_node (rounds as in
    `collect`: each asks for as many episodes as successes are still missing)."""
    from vdd_ros.ros.recorder import record_demonstrations
    from vdd_ros.sim.rollout import EVAL_SEED_BASE
    cfg = ctx.cfg
    bags = ctx.path('bags')
    shutil.rmtree(bags, ignore_errors=True)          # what an interrupted run left
    bags.mkdir(parents=True)
    max_attempts = 2 * cfg.demos + 10
    if cfg.collect_seed + max_attempts > EVAL_SEED_BASE:
        raise UserError(f'collection seeds must lie below {EVAL_SEED_BASE}; collect_seed '
                        f'{cfg.collect_seed} with up to {max_attempts} attempts does not')
    kept = attempts = messages = 0
    size = 0
    seed = cfg.collect_seed
    counts: dict[str, int] = {}
    lengths: list[int] = []
    rounds = 0
    while kept < cfg.demos and attempts < max_attempts:
        n = min(cfg.demos - kept, max_attempts - attempts)
        seeds = list(range(seed, seed + n))
        seed, attempts = seed + n, attempts + n
        summary, episodes = record_demonstrations(
            ctx.task, bags / f'round_{rounds}', seeds, binding=f'task:{ctx.task}',
            show_progress=ctx.show_progress)
        rounds += 1
        messages += sum(summary.messages.values())
        size += summary.bytes
        for e in episodes:
            if e['success']:
                kept += 1
                counts[e['mode']] = counts.get(e['mode'], 0) + 1
                lengths.append(int(e['length']))
    if kept < cfg.demos:
        ctx.log(f'  warning: only {kept} of {cfg.demos} demonstrations succeeded')
    ctx.log(f'  {kept} successful of {attempts} recorded episodes in {rounds} bag(s), '
            f'{messages} messages ({size / 2 ** 20:.1f} MB)')
    return {'kept': kept, 'discarded': attempts - kept, 'attempts': attempts,
            'rounds': rounds, 'messages': messages, 'mode_counts': counts,
            'mean_length': float(sum(lengths) / len(lengths)) if lengths else 0.0}


def _bag2dataset(ctx: Context) -> dict[str, Any]:
    from vdd_ros.bags import convert
    from vdd_ros.binding import binding_for_task
    bags = sorted(ctx.path('bags').glob('round_*'), key=lambda p: int(p.name.split('_')[1]))
    if not bags:
        raise UserError(f'{ctx.path("bags")}: no recorded bags')
    summary = convert(bags, binding_for_task(ctx.task), ctx.path('demos.hdf5'),
                      env_args={'task': ctx.task}, show_progress=ctx.show_progress)
    for line in summary.lines():
        ctx.log(f'  {line}')
    from vdd_ros.core.data import load_dataset
    demos = load_dataset(ctx.path('demos.hdf5')).demos
    counts: dict[str, int] = {}
    for d in demos:
        counts[str(d.mode)] = counts.get(str(d.mode), 0) + 1
    record = read_marker(ctx.folder, 'record') or {}
    attempts = (record.get('info') or {}).get('attempts')
    return {'kept': len(demos), 'attempts': attempts, 'mode_counts': counts,
            'mean_length': float(sum(len(d) for d in demos) / max(len(demos), 1)),
            'episodes': summary.episodes, 'samples': summary.samples,
            'mb_per_s': summary.mb_per_s}


VIA_BINDING = ('teacher', 'vdd_moe')   # evaluated over standard messages in via-bags runs


def native_folder(ctx: Context) -> Path:
    """The native pipeline's folder of this task (next to `<results>/via_bags`)."""
    return ctx.folder.parent.parent / ctx.task


def _native_fingerprint(ctx: Context) -> str:
    """Hash of the native pipeline's evaluations (the via-bags report compares with them)."""
    digest = hashlib.sha256()
    for name in VIA_BINDING:
        path = native_folder(ctx) / 'eval' / f'{name}.json'
        with contextlib.suppress(OSError):
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def compare_with_native(ctx: Context) -> dict[str, Any]:
    """Success of the teacher and the VDD-MoE via bags against the native pipeline's, on the
    same evaluation seeds (rows without native results say so)."""
    rows = []
    for name in VIA_BINDING:
        mine = json.loads(ctx.path(f'eval/{name}.json').read_text())
        row: dict[str, Any] = {'policy': name, 'via_bags': mine['success_rate'],
                               'via_bags_successes': mine['successes'],
                               'episodes': mine['episodes'], 'native': None}
        try:
            native = json.loads((native_folder(ctx) / 'eval' / f'{name}.json').read_text())
        except (OSError, json.JSONDecodeError):
            rows.append(row)
            continue
        a = {d['seed']: d for d in native.get('episodes_detail', [])}
        b = {d['seed']: d for d in mine.get('episodes_detail', [])}
        row.update(native=native['success_rate'], native_successes=native['successes'],
                   native_episodes=native['episodes'],
                   difference=mine['success_rate'] - native['success_rate'],
                   same_seeds=sorted(a) == sorted(b),
                   same_outcome=sum(a[k]['success'] == b[k]['success'] for k in a if k in b))
        rows.append(row)
    return {'native_folder': str(native_folder(ctx)), 'rows': rows,
            'binding': f'config/bindings/{ctx.task}.yaml'}


def _import_dataset(ctx: Context) -> dict[str, Any]:
    """The user's file as demos.hdf5: the chosen keys, the filter key's demos with the
    validation demos, the split kept; the environment checked by building it once."""
    from vdd_ros.core.data import load_dataset, write_dataset
    source = ctx.dataset or {}
    data = load_dataset(source['path'], source['obs_keys'], filter_key=source['filter_key'])
    write_dataset(ctx.path('demos.hdf5'), data.demos, data.obs_fields, data.env_args,
                  masks={'train': data.train_idx, 'valid': data.valid_idx})
    env = ctx.env()
    env.with_keys(k for k, _ in data.obs_fields).make().close()
    lengths = [len(d) for d in data.demos]
    ctx.log(f'  {len(data.demos)} demonstrations ({len(data.train_idx)} train, '
            f'{len(data.valid_idx)} valid), {sum(lengths)} steps, observation '
            f'{sum(n for _, n in data.obs_fields)}-d, {env.name}, horizon {env.horizon}')
    return {'kept': len(data.demos), 'mean_length': float(sum(lengths) / len(lengths)),
            'mode_counts': {}, 'train': len(data.train_idx), 'valid': len(data.valid_idx),
            'horizon': env.horizon, 'environment': env.name,
            'obs_keys': [k for k, _ in data.obs_fields]}


def _collect(ctx: Context) -> dict[str, Any]:
    from vdd_ros.sim.collection import collect
    cfg = ctx.cfg
    summary = collect(ctx.task, cfg.demos, str(ctx.path('demos.hdf5')),
                      workers=cfg.collect_workers, seed=cfg.collect_seed,
                      show_progress=ctx.show_progress)
    if not summary['complete']:
        ctx.log(f'  warning: only {summary["kept"]} of {cfg.demos} demonstrations succeeded')
    ctx.log(f'  {summary["kept"]} demonstrations ({_counts(summary["mode_counts"])}), '
            f'{summary["discarded"]} failed discarded')
    return {k: summary[k] for k in ('kept', 'discarded', 'attempts', 'steps', 'mode_counts',
                                    'mean_length', 'workers')}


def _train(method: str, ctx: Context) -> dict[str, Any]:
    from vdd_ros.core.jobs import baseline_job, distill_job, train_teacher_job
    from vdd_ros.core.progress import DivergenceError
    demos, out = ctx.path('demos.hdf5'), ctx.path(method)
    common = dict(overrides=ctx.cfg.train, device=ctx.device, show_bar=ctx.show_progress)
    try:
        if ctx.nproc > 1:
            from vdd_ros.core.launch import torchrun_job
            torchrun_job(method, demos, out, ctx.nproc, teacher=ctx.path('teacher'), **common)
        elif method == 'teacher':
            train_teacher_job(demos, out, **common)
        elif method == 'vdd_moe':
            distill_job(ctx.path('teacher'), demos, out, **common)
        else:
            baseline_job(method, demos, out, **common)
    except DivergenceError as exc:
        raise UserError(f'training diverged: {exc}') from None
    from vdd_ros.core.checkpoint import read_meta, read_training
    training = read_training(out)
    valid = (read_meta(out).get('metrics') or {}).get('valid_loss')
    info = {'iterations': training['iterations'], 'device': ctx.device,
            'final_loss': training['final_loss'], 'valid_loss': valid}
    ctx.log(f'  {info["iterations"]} iterations, final loss {info["final_loss"]:.4g}'
            + ('' if valid is None else f', validation loss {valid:.4g}'))
    return info


def policy_ref(ctx: Context, policy: str) -> Any:
    """What the runners load for `policy`: a checkpoint folder or a picklable factory."""
    from vdd_ros.core.checkpoint import load_policy
    source = str(ctx.path(POLICIES[policy][0]))
    if policy == 'teacher_1step':
        return functools.partial(load_policy, source, ctx.device, None, 1)
    if policy == 'teacher' and ctx.cfg.teacher_steps is not None:
        return functools.partial(load_policy, source, ctx.device, None, ctx.cfg.teacher_steps)
    if policy == 'vdd_moe' and ctx.cfg.expert_mode is not None:
        return functools.partial(load_policy, source, ctx.device, ctx.cfg.expert_mode)
    return source


def _evaluate(policy: str, ctx: Context) -> dict[str, Any]:
    from vdd_ros.sim.rollout import build_policy, evaluate, evaluation_seeds
    cfg = ctx.cfg
    seeds = evaluation_seeds(cfg.eval_episodes)
    ref = policy_ref(ctx, policy)
    env = ctx.env()
    if (policy == 'vdd_moe' and ctx.dataset is None) or (ctx.via_bags and policy in VIA_BINDING):
        from vdd_ros.ros.evaluation import evaluate_via_ros
        source = ctx.path(POLICIES[policy][0])
        if policy == 'teacher' and cfg.teacher_steps is not None:
            raise UserError('teacher_steps is not available with --via-bags (policy_node '
                            "runs the checkpoint's own sampling steps)")
        try:
            metrics = evaluate_via_ros(source, ctx.task, cfg.eval_episodes, seeds,
                                       control_rate_hz=cfg.ros_control_rate_hz,
                                       expert_mode=cfg.expert_mode if policy == 'vdd_moe'
                                       else None, device=ctx.device,
                                       show_progress=ctx.show_progress,
                                       binding=f'task:{ctx.task}' if ctx.via_bags else None)
        except UserError as exc:
            raise UserError(f'the ROS evaluation failed (no fallback to the in-process '
                            f'runner): {exc}') from None
    else:
        metrics = evaluate(ref, env, cfg.eval_episodes, workers=cfg.eval_workers,
                           seeds=seeds, show_progress=ctx.show_progress, device=ctx.device)
    built = build_policy(ref, env, ctx.device)
    model = built.model
    if hasattr(model, 'sampling_steps'):
        metrics['sampling_steps'] = int(model.sampling_steps)
    if hasattr(model, 'expert_mode'):
        metrics['expert_mode'] = str(model.expert_mode)
    metrics.update(query_latency(built, ctx.path('demos.hdf5'), cfg.latency_queries))
    label = POLICIES[policy][1]
    if ctx.via_bags and policy == 'teacher':
        label += ' (over ROS)'
    if ctx.dataset is not None and policy == 'vdd_moe':
        label = 'VDD-MoE'
    metrics.update(name=policy, label=label, checkpoint=POLICIES[policy][0],
                   device=ctx.device)
    write_json(ctx.path(f'eval/{policy}.json'), metrics)
    modes = f'({_counts(metrics["mode_counts"])}), mode entropy ' \
        f'{metrics["mode_entropy"]:.2f}' if metrics['mode_counts'] else '(no modes defined)'
    ctx.log(f'  success {metrics["successes"]}/{metrics["episodes"]} {modes}, '
            f'{metrics["query_ms_p50"]:.3f} ms per action (p50)')
    return {k: metrics[k] for k in ('success_rate', 'mode_entropy', 'query_ms_p50')}


def query_latency(policy: Any, dataset: Path, queries: int, warmup: int = 20
                  ) -> dict[str, float]:
    """Per-action inference latency of a loaded ModelPolicy, with no chunk to amortise it.

    Every `act` call queries the network (the policy's `action_exec` is set to 1), on the
    demonstrations' observations in episode order, one thread, batch 1: the cost of each
    action when the policy is queried at every control step, as `vdd-ros bench` measures it.
    """
    import numpy as np
    import torch

    from vdd_ros.core.bench import time_calls
    from vdd_ros.core.data import load_dataset
    data = load_dataset(dataset, [k for k, _ in policy.spec.obs_fields])
    observations = [(i, t, demo.obs[t]) for i, demo in enumerate(data.demos)
                    for t in range(len(demo))]
    policy.spec = dataclasses.replace(policy.spec, action_exec=1)
    cursor = iter(observations * (1 + (queries + warmup) // max(len(observations), 1)))

    def step() -> None:
        episode, t, obs = next(cursor)
        if t == 0:
            policy.reset(episode)
        policy.act(obs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = time_calls(step, queries, warmup)
    finally:
        torch.set_num_threads(threads)
    return {'query_ms_p50': float(np.percentile(ms, 50)),
            'query_ms_p99': float(np.percentile(ms, 99)), 'query_ms_mean': float(ms.mean()),
            'query_count': int(queries)}


def _video(ctx: Context) -> dict[str, Any]:
    detail = json.loads(ctx.path('eval/vdd_moe.json').read_text())['episodes_detail']
    shown = render_mode_gif(policy_ref(ctx, 'vdd_moe'), ctx.env(), detail,
                            ctx.cfg.video_episodes_per_mode, ctx.path(GIF_NAME), ctx.device)
    ctx.log(f'  {GIF_NAME}: ' + '; '.join(f'{m}: seeds {", ".join(map(str, s)) or "none"}'
                                           for m, s in shown.items()))
    return {'episodes': shown}


def pick_mode_episodes(detail: list[dict[str, Any]], modes: list[str], per_mode: int
                       ) -> dict[str, list[tuple[int, bool]]]:
    """(seed, succeeded) of up to `per_mode` evaluation episodes per mode: successes first,
    then episodes that committed to the mode but failed; the first episode when none did."""
    picks: dict[str, list[tuple[int, bool]]] = {}
    for mode in modes:
        ranked = [d for d in detail if d['mode'] == mode and d['success']] + \
            [d for d in detail if d['mode'] == mode and not d['success']]
        picks[mode] = [(int(d['seed']), bool(d['success'])) for d in ranked[:per_mode]]
    if not any(picks.values()) and detail:
        picks = {'no mode': [(int(detail[0]['seed']), bool(detail[0]['success']))]}
    return {m: p for m, p in picks.items() if p}


def render_mode_gif(ref: Any, task: Any, detail: list[dict[str, Any]], per_mode: int,
                    out: Path, device: str = 'cpu', frame_step: int = 2
                    ) -> dict[str, list[int]]:
    """Render the picked episodes of each mode side by side, one panel per mode with a
    caption strip, into one GIF (written atomically). Returns the seeds shown per mode.

    The episodes are replayed in this process with the same seeds (and so the same
    outcomes) as in the evaluation; every `frame_step`-th frame is kept.
    """
    import numpy as np
    from PIL import Image

    from vdd_ros.sim.rollout import build_policy, env_info, render_env, run_episode
    _, modes, _ = env_info(task)
    picks = pick_mode_episodes(detail, modes, per_mode)
    policy = build_policy(ref, task, device)
    panels: list[list[np.ndarray]] = []
    env, fps = render_env(task, policy)
    with env:
        for mode, episodes in picks.items():
            frames: list[np.ndarray] = []
            for seed, _ in episodes:
                raw: list[np.ndarray] = []
                rec = run_episode(env, policy, seed, frames=raw)
                outcome = 'success' if rec['success'] else f'failed ({rec["mode"] or "-"})'
                caption = f'VDD-MoE | {mode} | seed {seed} | {outcome}'
                frames += [_captioned(f, caption) for f in raw[::frame_step] + raw[-1:]]
            panels.append(frames)
    length = max(len(p) for p in panels)
    images = [Image.fromarray(np.concatenate([p[min(i, len(p) - 1)] for p in panels], axis=1))
              for i in range(length)]
    with atomic_path(out) as tmp:
        images[0].save(tmp, format='GIF', save_all=True, append_images=images[1:], loop=0,
                       duration=int(round(1000 * frame_step / fps)))
    return {m: [s for s, _ in p] for m, p in picks.items()}


def _captioned(frame: Any, text: str, height: int = 18) -> Any:
    """`frame` (H x W x 3 uint8) with a caption strip on top."""
    import numpy as np
    from PIL import Image, ImageDraw
    strip = Image.new('RGB', (frame.shape[1], height), (20, 20, 20))
    ImageDraw.Draw(strip).text((4, 3), text, fill=(240, 240, 240))
    return np.concatenate([np.asarray(strip), frame], axis=0)


def _report(ctx: Context) -> dict[str, Any]:
    from vdd_ros.report import assemble_metrics, render_task_report
    metrics = assemble_metrics(ctx.folder, to_dict(ctx.cfg), to_dict(ctx.train),
                               [s.name for s in build_stages(ctx)])
    if ctx.via_bags:
        metrics['via_bags'] = compare_with_native(ctx)
    write_json(ctx.path('metrics.json'), metrics)
    render_task_report(ctx.folder)
    return {'targets_met': metrics['targets_met']}


def _counts(counts: Mapping[str, int]) -> str:
    return ', '.join(f'{k} {v}' for k, v in counts.items())


# -- markers and the runner -------------------------------------------------------------------
def marker_path(folder: Path, stage: str) -> Path:
    return folder / 'stages' / f'{stage}.json'


def read_marker(folder: Path, stage: str) -> dict[str, Any] | None:
    """A stage's marker, or None when it is missing or unreadable."""
    try:
        data = json.loads(marker_path(folder, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def stage_key(settings: Mapping[str, Any], deps: Mapping[str, str]) -> str:
    """Hash of a stage's settings and the run ids of the stages it reads."""
    text = json.dumps({'settings': settings, 'deps': deps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _decide(ctx: Context, stage: Stage, deps: dict[str, str], forced: bool
            ) -> tuple[bool, str]:
    """(run?, why) for one stage."""
    if forced:
        return True, 'forced'
    marker = read_marker(ctx.folder, stage.name)
    if marker is None:
        return True, 'not done yet'
    if marker.get('key') != stage_key(stage.settings, deps):
        settings = json.loads(json.dumps(stage.settings, default=str))
        if marker.get('settings') != settings:
            return True, 'settings changed'
        changed = [d for d, run_id in deps.items() if (marker.get('deps') or {}).get(d) != run_id]
        return True, f'input rerun ({", ".join(changed) or "?"})'
    missing = [o for o in stage.outputs if not ctx.path(o).exists()]
    if missing:
        return True, f'output missing ({missing[0]})'
    return False, f'done {marker.get("finished", "?")}, {marker.get("wall_s", 0):.1f} s'


def run_pipeline(task: str, cfg: PipelineConfig, results: str | os.PathLike = 'results', *,
                 device: str = 'cpu', force: bool = False, rerun_from: str | None = None,
                 show_progress: bool = True, log: Callable[[str], None] = print,
                 via_bags: bool = False, nproc: int = 1,
                 dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline on `task`; returns the metrics written to metrics.json.

    With `dataset` (`dataset_source`) the run is on the user's file, in `<results>/<task>`.

    With `nproc` > 1 the training stages run data-parallel on that many torchrun ranks.

    `force` reruns every stage; `rerun_from` reruns that stage (and so everything after it
    that reads it). `via_bags`: everything over standard ROS 2 messages, under
    `<results>/via_bags/<task>/` (see the module docstring).
    """
    results = results_root(results, via_bags)
    if dataset is not None and via_bags:
        raise UserError('--via-bags records the registered tasks; it does not apply to '
                        '--dataset')
    ctx = Context(task, Path(results) / task, cfg, cfg.train_config(), device, show_progress,
                  log, via_bags, nproc, dataset)
    stages = build_stages(ctx)
    names = [s.name for s in stages]
    if rerun_from is not None and rerun_from not in names:
        raise UserError(f'unknown stage {rerun_from!r} (stages: {", ".join(names)})')
    check_writable(ctx.folder, 'results folder', folder=True)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    with task_lock(ctx.folder):
        remove_stale_temporaries(ctx.folder)
        return _run_stages(ctx, stages, force, rerun_from, Path(results))


def results_root(results: str | os.PathLike, via_bags: bool = False) -> Path:
    """Where a run's task folders go: `<results>`, or `<results>/via_bags` for via-bags runs."""
    return Path(results) / 'via_bags' if via_bags else Path(results)


@contextlib.contextmanager
def task_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>/.lock` for the run: one run per task folder.

    The lock is an exclusive `flock` on the file, held while the file stays open, so the
    kernel releases it when the holder dies however it dies (no stale lock to take over).
    The file holds the holder's process id for the error message. A contender that locked
    a file the holder unlinked while leaving retries on the path's current file.
    """
    lock = folder / '.lock'
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise UserError(f'{folder}: another pipeline run (process {holder}) is working '
                            f'here; wait for it to finish') from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # the file was unlinked by a holder that just left: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)   # while still locked, so no one locks a dead file
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files and folders (`.name.tmp...`, `.name.old-...`) that a killed
    run left behind; under the task lock nothing else is writing them."""
    stale = [p for p in folder.rglob('.*') if p.name != '.lock'
             and ('.tmp' in p.name or '.old-' in p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _run_stages(ctx: Context, stages: list[Stage], force: bool, rerun_from: str | None,
                results: Path) -> dict[str, Any]:
    log = ctx.log
    start = time.monotonic()
    ran: list[str] = []
    for index, stage in enumerate(stages, 1):
        deps = {}
        for dep in stage.deps:
            marker = read_marker(ctx.folder, dep)
            if marker is None:  # only when a dependency's marker vanished during this run
                raise UserError(f'stage {stage.name}: input stage {dep} has no marker')
            deps[dep] = marker['run_id']
        run, why = _decide(ctx, stage, deps, force or stage.name == rerun_from)
        log(f'== [{index}/{len(stages)}] {stage.name}: {stage.title} -- '
            f'{"run" if run else "skip"} ({why})')
        if not run:
            continue
        marker_path(ctx.folder, stage.name).unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            info = stage.run(ctx)
        except UserError as exc:
            raise UserError(f'stage {stage.name} failed: {exc}') from None
        except KeyboardInterrupt:
            log(f'stage {stage.name} interrupted; finished stages are kept, rerun to resume')
            raise
        wall = time.monotonic() - t0
        missing = [o for o in stage.outputs if not ctx.path(o).exists()]
        if missing:
            raise UserError(f'stage {stage.name} did not write {missing[0]}')
        write_json(marker_path(ctx.folder, stage.name), {
            'stage': stage.name, 'key': stage_key(stage.settings, deps),
            'run_id': uuid.uuid4().hex, 'deps': deps,
            'settings': json.loads(json.dumps(stage.settings, default=str)),
            'outputs': stage.outputs, 'wall_s': wall,
            'finished': datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds'),
            'info': info})
        ran.append(stage.name)
        log(f'   {stage.name} done in {wall:.1f} s')
    from vdd_ros.report import format_summary, write_summary
    metrics = json.loads(ctx.path('metrics.json').read_text())
    summary = write_summary(results)
    log(format_summary(metrics))
    log(f'ran {len(ran)} of {len(stages)} stages in {time.monotonic() - start:.1f} s; '
        f'report: {ctx.path("report.md")}'
        + (f'; cross-task summary: {summary}' if summary else ''))
    return metrics


def describe_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (for the console and the report)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()
