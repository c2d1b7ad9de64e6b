"""The stages of a pipeline run, built from the registry of policy kinds (vdd_ros/policies.py).

    <data> -> for each training seed s, under seed_<s>/:
                  one training stage per kind (teacher first; students read seed_<s>/teacher)
                  -> eval_<evaluation> for every evaluation of every kind
                  -> latency (every evaluation's per-action latency, timed in turn)
           -> video (the first seed's VDD-MoE) -> report (every seed, with intervals)

`<data>` is `collect` (the task's scripted demonstrations), `dataset` (the user's file) or
`record` -> `bag2dataset` (via bags); it is shared by every training seed, which varies only
the models' initialisation and sampling. Evaluations use the test seeds (`evaluation_seeds`);
`vdd-ros tune` builds its own stages on validation seeds (pipeline/tune.py).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from vdd_ros.core.config import TrainConfig, to_dict
from vdd_ros.core.io import check_writable, write_json
from vdd_ros.core.policy import NOISE_SEEDING
from vdd_ros.errors import UserError
from vdd_ros.pipeline.config import PipelineConfig
from vdd_ros.pipeline.media import LATENCY_ROUNDS, query_latencies, render_mode_gif
from vdd_ros.pipeline.runner import (Context, Stage, check_stage_name, read_marker,
                                     remove_stale_temporaries, results_root, run_stages,
                                     seed_dir, task_lock)
from vdd_ros.policies import (EVALUATIONS, POLICY_KINDS, STUDENT, TEACHER, Evaluation,
                              PolicyKind)

GIF_NAME = 'vdd_moe_modes.gif'


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


def train_settings(train: TrainConfig, kind: PolicyKind, cameras: bool = False
                   ) -> dict[str, Any]:
    """What keys a kind's training stage: the seed, the chunking and the kind's sections (and
    the image encoders' settings when the observation has cameras; whose encoder the VDD-MoE
    uses keys its own stage only)."""
    d = to_dict(train)
    out = {k: d[k] for k in ('seed', 'obs_horizon', 'action_horizon', 'action_exec')}
    # an optional setting left unset keys nothing, so adding one keeps earlier stages cached
    out.update({k: {n: v for n, v in d[k].items() if v is not None} for k in kind.sections})
    if cameras:
        out['vision'] = {k: v for k, v in d['vision'].items()
                         if k != 'moe_encoder' or 'vdd' in kind.sections}
    return out


def data_stages(ctx: Context) -> list[Stage]:
    """The stage(s) that write demos.hdf5: collect, dataset, or record and bag2dataset."""
    cfg = ctx.cfg
    collection: dict[str, Any] = {'task': ctx.task, 'demos': cfg.demos,
                                  'seed': cfg.collect_seed}
    if ctx.dataset is None and ctx.cameras():
        from vdd_ros.sim.cameras import SUPERSAMPLE
        from vdd_ros.sim.tasks import get_task
        collection['images'] = {'side': get_task(ctx.task).image_side,
                                'supersample': SUPERSAMPLE}
    if ctx.dataset is not None:
        return [Stage('dataset', 'import the dataset', (), ['demos.hdf5'],
                      {**ctx.dataset, 'horizon': cfg.horizon}, _import_dataset)]
    if ctx.via_bags:
        return [
            Stage('record', 'record scripted demonstrations through the ROS nodes', (),
                  ['bags'], {**collection, 'binding': _binding_text(ctx.task)}, _record),
            Stage('bag2dataset', 'convert the bags into a dataset', ('record',),
                  ['demos.hdf5'], {'binding': _binding_text(ctx.task)}, _bag2dataset)]
    return [Stage('collect', 'collect scripted demonstrations', (), ['demos.hdf5'],
                  collection, _collect)]


def training_stage(ctx: Context, kind: PolicyKind, seed: int, data: str, prefix: str,
                   overrides: Mapping[str, Any] | None = None,
                   teacher: str | None = None) -> Stage:
    """The stage training `kind` with `seed` into `<prefix>/<kind>` (`overrides` on top of
    the run's training settings; a student reads `teacher`, default `<prefix>/teacher`)."""
    train = ctx.cfg.train_config() if overrides is None else _train_config(ctx, overrides)
    train.seed = seed
    teacher = teacher or f'{prefix}/teacher'
    deps = (data, teacher) if kind.needs_teacher else (data,)
    settings = {**train_settings(train, kind, ctx.cameras()),
                'overrides': dict(overrides or {})}
    return Stage(f'{prefix}/{kind.name}', f'{kind.title} (seed {seed})', deps,
                 [f'{prefix}/{kind.name}'], settings,
                 functools.partial(_train, kind.name, seed=seed, prefix=prefix,
                                   overrides=dict(overrides or {}), teacher=teacher))


def _train_config(ctx: Context, overrides: Mapping[str, Any]) -> TrainConfig:
    from vdd_ros.pipeline.config import PipelineConfig as Config
    return Config(train={**ctx.cfg.train, **overrides}).train_config()


def eval_settings(ctx: Context, evaluation: Evaluation, via_ros: bool) -> dict[str, Any]:
    """What keys an evaluation stage: its episode_settings, and the ROS settings when it runs
    through the nodes."""
    cfg = ctx.cfg
    settings = episode_settings(ctx, evaluation.name, ctx.eval_split)
    if via_ros:
        settings.update(via_ros=True, control_rate_hz=cfg.ros_control_rate_hz)
        if ctx.via_bags:
            settings['binding'] = f'task:{ctx.task}'
    return settings


def episode_settings(ctx: Context, evaluation: str, split: str) -> dict[str, Any]:
    """What keys the rollouts of an evaluation: how many episodes, their split, how the
    policy seeds its sampling noise, and how it acts."""
    return {'episodes': ctx.cfg.eval_episodes, 'split': split, 'noise': NOISE_SEEDING,
            **acting_settings(ctx, evaluation)}


def acting_settings(ctx: Context, evaluation: str) -> dict[str, Any]:
    """How an evaluation's policy acts: a teacher's sampling steps, the VDD-MoE's expert
    choice (None: the checkpoint's), nothing for the other kinds."""
    if EVALUATIONS[evaluation][1].model_kind == 'teacher':
        return {'steps': EVALUATIONS[evaluation][0].steps or ctx.cfg.teacher_steps}
    if evaluation == STUDENT:
        return {'expert_mode': ctx.cfg.expert_mode}
    return {}


def latency_stage(ctx: Context, seed: int, data: str) -> Stage:
    """The stage timing every evaluation's policy of `seed` in turn (after its rollouts, so
    that no evaluation shares the machine with the timing) into `seed_<s>/latency.json`."""
    prefix = seed_dir(seed)
    kinds = ctx.cfg.kinds()
    names = [n for n, (_, kind) in EVALUATIONS.items() if kind.name in kinds]
    return Stage(f'{prefix}/latency', f'per-action latency of every policy (seed {seed})',
                 (data, *(f'{prefix}/{k}' for k in kinds)),
                 [f'{prefix}/latency.json'],
                 {'queries': ctx.cfg.latency_queries, 'rounds': LATENCY_ROUNDS, 'threads': 1,
                  'policies': {n: acting_settings(ctx, n) for n in names}},
                 functools.partial(_latency, names, seed=seed))


VIA_BINDING = ('teacher', 'vdd_moe')   # evaluated over standard messages in via-bags runs


def via_ros(ctx: Context, evaluation: str) -> bool:
    """Whether an evaluation runs through sim_node and policy_node: the VDD-MoE on a task,
    and with --via-bags the teacher and the VDD-MoE."""
    return (evaluation == STUDENT and ctx.dataset is None) or \
        (ctx.via_bags and evaluation in VIA_BINDING)


def build_stages(ctx: Context) -> list[Stage]:
    """The stages of a run, in execution order."""
    cfg = ctx.cfg
    stages = data_stages(ctx)
    data = stages[-1].name
    for seed in ctx.seeds:
        prefix = seed_dir(seed)
        kinds = cfg.kinds()
        stages += [training_stage(ctx, POLICY_KINDS[k], seed, data, prefix) for k in kinds]
        for name, (evaluation, kind) in EVALUATIONS.items():
            if kind.name not in kinds:
                continue
            ros = via_ros(ctx, name)
            stages.append(Stage(f'{prefix}/eval_{name}',
                                f'evaluate: {evaluation.label} (seed {seed})',
                                (data, f'{prefix}/{kind.name}'), [f'{prefix}/eval/{name}.json'],
                                eval_settings(ctx, evaluation, ros),
                                functools.partial(_evaluate, name, seed=seed)))
        stages.append(latency_stage(ctx, seed, data))
    first = seed_dir(ctx.seeds[0])
    stages.append(Stage('video', 'render VDD-MoE rollouts' + ('' if ctx.dataset else
                                                              ' of each mode'),
                        (f'{first}/eval_{STUDENT}',), [GIF_NAME],
                        {'per_mode': cfg.video_episodes_per_mode,
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
        path = native_folder(ctx) / seed_dir(ctx.seeds[0]) / 'eval' / f'{name}.json'
        with contextlib.suppress(OSError):
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def compare_with_native(ctx: Context) -> dict[str, Any]:
    """Success of the teacher and the VDD-MoE via bags against the native pipeline's, on the
    same evaluation seeds (rows without native results say so)."""
    rows = []
    for name in VIA_BINDING:
        mine = json.loads(ctx.path(f'{seed_dir(ctx.seeds[0])}/eval/{name}.json').read_text())
        row: dict[str, Any] = {'policy': name, 'via_bags': mine['success_rate'],
                               'via_bags_successes': mine['successes'],
                               'episodes': mine['episodes'], 'native': None}
        try:
            native = json.loads((native_folder(ctx) / seed_dir(ctx.seeds[0]) / 'eval'
                                 / f'{name}.json').read_text())
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


def _train(method: str, ctx: Context, seed: int | None = None, prefix: str | None = None,
           overrides: Mapping[str, Any] | None = None, teacher: str | None = None
           ) -> dict[str, Any]:
    """Train the kind `method` with `seed` (default: the run's first) into `<prefix>/<kind>`
    (default prefix: the seed's folder); on `nproc` > 1 torchrun ranks when asked."""
    from vdd_ros.core.progress import DivergenceError
    kind = POLICY_KINDS[method]
    seed = ctx.seeds[0] if seed is None else seed
    prefix = prefix or seed_dir(seed)
    demos, out = ctx.path('demos.hdf5'), ctx.path(f'{prefix}/{method}')
    source = ctx.path(teacher or f'{prefix}/teacher') if kind.needs_teacher else None
    common = dict(overrides={**ctx.cfg.train, **(overrides or {}), 'seed': seed},
                  device=ctx.device, show_bar=ctx.show_progress)
    try:
        if ctx.nproc > 1:
            from vdd_ros.core.launch import torchrun_job
            torchrun_job(method, demos, out, ctx.nproc, teacher=source, **common)
        else:
            kind.train(demos, out, teacher=source, **common)
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


def policy_ref(ctx: Context, evaluation: str, source: str | Path) -> Any:
    """What the runners load for `evaluation` from the checkpoint folder `source`: the
    folder, or a picklable factory that sets the sampling steps or the expert choice."""
    from vdd_ros.core.checkpoint import load_policy
    ev, kind = EVALUATIONS[evaluation]
    steps = ev.steps or (ctx.cfg.teacher_steps if kind.model_kind == 'teacher' else None)
    if steps is not None:
        return functools.partial(load_policy, str(source), ctx.device, None, steps)
    if evaluation == STUDENT and ctx.cfg.expert_mode is not None:
        return functools.partial(load_policy, str(source), ctx.device, ctx.cfg.expert_mode)
    return str(source)


def evaluation_seeds(ctx: Context) -> list[int]:
    """The episodes' seeds: test seeds for the report, validation seeds for tuning."""
    from vdd_ros.sim.rollout import evaluation_seeds as test, validation_seeds
    return (validation_seeds if ctx.eval_split == 'valid' else test)(ctx.cfg.eval_episodes)


def _evaluate(policy: str, ctx: Context, seed: int | None = None, prefix: str | None = None,
              ros: bool | None = None, folder: str = 'eval') -> dict[str, Any]:
    """Evaluate `policy` (an evaluation's name) from `<prefix>/<its kind>` into
    `<prefix>/<folder>/<policy>.json`, in process or through the ROS nodes (`via_ros`)."""
    from vdd_ros.sim.rollout import build_policy, evaluate
    cfg = ctx.cfg
    evaluation, kind = EVALUATIONS[policy]
    prefix = prefix or seed_dir(ctx.seeds[0] if seed is None else seed)
    seeds = evaluation_seeds(ctx)
    source = ctx.path(f'{prefix}/{kind.name}')
    ref = policy_ref(ctx, policy, source)
    env = ctx.env()
    ros = via_ros(ctx, policy) if ros is None else ros
    if ros:
        from vdd_ros.ros.evaluation import evaluate_via_ros
        if kind.model_kind == 'teacher' and (evaluation.steps or cfg.teacher_steps):
            raise UserError('teacher_steps is not available with --via-bags (policy_node '
                            "runs the checkpoint's own sampling steps)")
        try:
            metrics = evaluate_via_ros(source, ctx.task, cfg.eval_episodes, seeds,
                                       control_rate_hz=cfg.ros_control_rate_hz,
                                       expert_mode=cfg.expert_mode if policy == STUDENT
                                       else None, device=ctx.device,
                                       show_progress=ctx.show_progress,
                                       binding=f'task:{ctx.task}' if ctx.via_bags else None)
        except UserError as exc:
            raise UserError(f'the ROS evaluation failed (no fallback to the in-process '
                            f'runner): {exc}') from None
    else:
        metrics = evaluate(ref, env, cfg.eval_episodes, workers=cfg.eval_workers,
                           seeds=seeds, show_progress=ctx.show_progress, device=ctx.device)
    metrics.update(build_policy(ref, env, ctx.device).model.describe())
    label = evaluation.label + (' (over ROS)' if ros else '')
    metrics.update(name=policy, label=label, checkpoint=kind.name, device=ctx.device,
                   split=ctx.eval_split)
    write_json(ctx.path(f'{prefix}/{folder}/{policy}.json'), metrics)
    modes = f'({_counts(metrics["mode_counts"])}), mode entropy ' \
        f'{metrics["mode_entropy"]:.2f}' if metrics['mode_counts'] else '(no modes defined)'
    ctx.log(f'  success {metrics["successes"]}/{metrics["episodes"]} {modes}')
    return {k: metrics[k] for k in ('success_rate', 'mode_entropy')}


def _latency(names: list[str], ctx: Context, seed: int) -> dict[str, Any]:
    """Time the policies of `names` (evaluations) of training seed `seed` in turn."""
    from vdd_ros.sim.rollout import build_policy
    prefix = seed_dir(seed)
    env = ctx.env()
    policies = {n: build_policy(policy_ref(ctx, n, ctx.path(f'{prefix}/{kind.name}')), env,
                                ctx.device)
                for n, (_, kind) in EVALUATIONS.items() if n in names}
    timed = query_latencies(policies, ctx.path('demos.hdf5'), ctx.cfg.latency_queries)
    write_json(ctx.path(f'{prefix}/latency.json'),
               {'queries': ctx.cfg.latency_queries, 'rounds': LATENCY_ROUNDS, 'threads': 1,
                'device': ctx.device, 'policies': timed})
    teacher = timed[TEACHER]['query_ms_p50']
    width = max(len(EVALUATIONS[n][0].label) for n in names)
    for n in names:
        ms = timed[n]['query_ms_p50']
        ctx.log(f'  {EVALUATIONS[n][0].label:<{width}}  {ms:7.3f} ms per action (p50), '
                f'speed-up over the teacher {teacher / ms:4.1f}x')
    return {n: timed[n]['query_ms_p50'] for n in names}


def _video(ctx: Context) -> dict[str, Any]:
    first = seed_dir(ctx.seeds[0])
    detail = json.loads(ctx.path(f'{first}/eval/{STUDENT}.json').read_text())[
        'episodes_detail']
    ref = policy_ref(ctx, STUDENT, ctx.path(f'{first}/{STUDENT}'))
    shown = render_mode_gif(ref, ctx.env(), detail, ctx.cfg.video_episodes_per_mode,
                            ctx.path(GIF_NAME), ctx.device)
    ctx.log(f'  {GIF_NAME}: ' + '; '.join(f'{m}: seeds {", ".join(map(str, s)) or "none"}'
                                           for m, s in shown.items()))
    return {'episodes': shown}


def _report(ctx: Context) -> dict[str, Any]:
    from vdd_ros.report import assemble_metrics, render_task_report
    metrics = assemble_metrics(ctx.folder, to_dict(ctx.cfg), to_dict(ctx.train),
                               [s.name for s in build_stages(ctx)], ctx.seeds)
    if ctx.via_bags:
        metrics['via_bags'] = compare_with_native(ctx)
    write_json(ctx.path('metrics.json'), metrics)
    render_task_report(ctx.folder)
    return {'targets_met': metrics['targets_met']}


def _counts(counts: Mapping[str, int]) -> str:
    return ', '.join(f'{k} {v}' for k, v in counts.items())


def run_pipeline(task: str, cfg: PipelineConfig, results: str | os.PathLike = 'results', *,
                 device: str = 'cpu', force: bool = False, rerun_from: str | None = None,
                 show_progress: bool = True, log: Any = print, via_bags: bool = False,
                 nproc: int = 1, dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline on `task`; returns the metrics written to metrics.json.

    With `dataset` (`dataset_source`) the run is on the user's file, in `<results>/<task>`.
    With `nproc` > 1 the training stages run data-parallel on that many torchrun ranks.
    `force` reruns every stage; `rerun_from` reruns that stage (and so everything after it
    that reads it; a per-seed stage's name without its folder names it in every seed).
    `via_bags`: everything over standard ROS 2 messages, under `<results>/via_bags/<task>/`.
    """
    import time
    root = results_root(results, via_bags)
    if dataset is not None and via_bags:
        raise UserError('--via-bags records the registered tasks; it does not apply to '
                        '--dataset')
    ctx = Context(task, root / task, cfg, cfg.train_config(), device, show_progress,
                  log, via_bags, nproc, dataset)
    stages = build_stages(ctx)
    check_stage_name(rerun_from, stages)
    check_writable(ctx.folder, 'results folder', folder=True)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with task_lock(ctx.folder):
        remove_stale_temporaries(ctx.folder)
        ran = run_stages(ctx, stages, force, rerun_from)
    from vdd_ros.report import format_summary, write_summary
    metrics = json.loads(ctx.path('metrics.json').read_text())
    summary = write_summary(root)
    log(format_summary(metrics))
    log(f'ran {len(ran)} of {len(stages)} stages in {time.monotonic() - start:.1f} s; '
        f'report: {ctx.path("report.md")}'
        + (f'; cross-task summary: {summary}' if summary else ''))
    return metrics
