"""`vdd-ros tune`: candidate settings of the VDD-MoE, each scored on validation seeds only.

The candidates (config/tune.yaml) are dotted training overrides. In the task's results
folder, next to the pipeline's stages and sharing its cached data and first-seed teacher
(a candidate that changes `teacher.*` trains its own), each candidate gets

    tune/<candidate>/vdd_moe -> tune/<candidate>/eval_vdd_moe (validation seeds, in process)

and `tune/report` writes tune/tune.json, tune/tune.md and tune/candidates.png: validation
success and mode entropy with 95% intervals, per candidate. This is both the tuning protocol
(the defaults are chosen from it) and the ablation table. The test seeds are sealed for the
whole run (`sealed_test_seeds`): reading one raises, so tuning cannot leak into the report.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vdd_ros.core.config import ConfigError, from_dict, key_text, read_yaml_mapping
from vdd_ros.core.io import check_writable, package_config, write_json, write_text
from vdd_ros.errors import UserError
from vdd_ros.pipeline.config import PipelineConfig, flatten
from vdd_ros.pipeline.runner import (Context, Stage, check_stage_name,
                                     remove_stale_temporaries, run_stages, seed_dir, task_lock)
from vdd_ros.pipeline.stages import _evaluate, data_stages, training_stage
from vdd_ros.policies import POLICY_KINDS, STUDENT, TEACHER

CANDIDATE_NAME = 'candidate names are letters, digits and _'


@dataclass
class TuneConfig:
    """config/tune.yaml: the candidates, each a mapping of dotted training overrides."""

    candidates: dict[str, dict[str, Any]] = field(default_factory=lambda: {'default': {}})

    def validate(self) -> None:
        if not isinstance(self.candidates, Mapping) or not self.candidates:
            raise ConfigError('candidates: expected a non-empty mapping of names to dotted '
                              'training overrides')
        for name, overrides in self.candidates.items():
            if not (isinstance(name, str) and name.replace('_', 'a').isalnum()
                    and name.isascii()):
                raise ConfigError(f'candidates.{key_text(name)}: {CANDIDATE_NAME}')
            if not isinstance(overrides, Mapping):
                raise ConfigError(f'candidates.{name}: expected a mapping of dotted training '
                                  f'keys, got {overrides!r}')
            flat = flatten(overrides or {})
            try:
                PipelineConfig(train=flat).validate()
            except ConfigError as exc:
                raise ConfigError(f'candidates.{name}.{str(exc).partition("train.")[2]}'
                                  ) from None
            self.candidates[name] = flat


def load_tune_config(path: str | os.PathLike | None = None) -> TuneConfig:
    """config/tune.yaml (or `path`), validated; errors name the file and the field."""
    path = Path(path) if path is not None else package_config('tune.yaml')
    if path is None:
        raise UserError('config/tune.yaml not found (pass --candidates)')
    return from_dict(TuneConfig, read_yaml_mapping(path), str(path))


def build_tune_stages(ctx: Context, tune: TuneConfig) -> list[Stage]:
    """The data stage, the shared teacher, each candidate's VDD-MoE and its validation
    evaluation, and the tuning report."""
    stages = data_stages(ctx)
    data = stages[-1].name
    seed = ctx.seeds[0]
    teacher = POLICY_KINDS[TEACHER]
    stages.append(training_stage(ctx, teacher, seed, data, seed_dir(seed)))
    for name, overrides in tune.candidates.items():
        prefix = f'tune/{name}'
        own_teacher = any(k.startswith(f'{TEACHER}.') for k in overrides)
        if own_teacher:
            stages.append(training_stage(ctx, teacher, seed, data, prefix, overrides))
        source = f'{prefix}/{TEACHER}' if own_teacher else f'{seed_dir(seed)}/{TEACHER}'
        stages.append(training_stage(ctx, POLICY_KINDS[STUDENT], seed, data, prefix, overrides,
                                     teacher=source))
        stages.append(Stage(
            f'{prefix}/eval_{STUDENT}', f'validation episodes: {name}',
            (data, f'{prefix}/{STUDENT}'), [f'{prefix}/eval/{STUDENT}.json'],
            {'episodes': ctx.cfg.eval_episodes, 'split': 'valid',
             'latency_queries': ctx.cfg.latency_queries, 'expert_mode': ctx.cfg.expert_mode},
            functools.partial(_evaluate, STUDENT, prefix=prefix, ros=False)))
    stages.append(Stage('tune/report', 'tuning report', tuple(s.name for s in stages),
                        ['tune/tune.json', 'tune/tune.md', 'tune/candidates.png'],
                        {'candidates': tune.candidates},
                        functools.partial(_tune_report, tune)))
    return stages


def _tune_report(tune: TuneConfig, ctx: Context) -> dict[str, Any]:
    import json

    from vdd_ros.report import interval_summary, plot_candidates
    rows = []
    for name, overrides in tune.candidates.items():
        ev = json.loads(ctx.path(f'tune/{name}/eval/{STUDENT}.json').read_text())
        rows.append({'candidate': name, 'overrides': overrides,
                     **interval_summary([ev], ctx.modes())})
    best = max(rows, key=lambda r: (round(r['success_rate'], 6), r['mode_entropy'] or 0.0))
    result = {'task': ctx.task, 'split': 'valid', 'episodes': ctx.cfg.eval_episodes,
              'training_seed': ctx.seeds[0], 'rows': rows, 'best': best['candidate']}
    write_json(ctx.path('tune/tune.json'), result)
    write_text(ctx.path('tune/tune.md'), tune_markdown(result))
    plot_candidates(result, ctx.path('tune/candidates.png'))
    for r in rows:
        ctx.log(f"  {r['candidate']:<20} success {r['success_rate']:.2f} "
                f"[{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}]"
                + (f", entropy {r['mode_entropy']:.2f}" if r['mode_entropy'] is not None
                   else ''))
    return {'best': best['candidate']}


def tune_markdown(result: Mapping[str, Any]) -> str:
    """tune.md: the candidates and their validation scores."""
    lines = ['| candidate | overrides | validation success [95% CI] | mode entropy [95% CI] |',
             '|---|---|---|---|']
    for r in result['rows']:
        over = ', '.join(f'`{k}={v}`' for k, v in r['overrides'].items()) or '(defaults)'
        ent = '-' if r['mode_entropy'] is None else \
            f"{r['mode_entropy']:.2f} [{r['entropy_ci'][0]:.2f}, {r['entropy_ci'][1]:.2f}]"
        lines.append(f"| {r['candidate']} | {over} | {r['success_rate']:.2f} "
                     f"[{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}] | {ent} |")
    return (f"# Tuning the VDD-MoE on `{result['task']}` (validation seeds)\n\n"
            f"{result['episodes']} validation episodes per candidate (seeds from 2000000; the "
            f"test seeds are sealed while tuning), training seed {result['training_seed']}. "
            f"Intervals: bootstrap over rollouts. Highest validation success (then entropy): "
            f"**{result['best']}**.\n\n" + '\n'.join(lines) + '\n\n'
            '![candidates](candidates.png)\n')


def run_tune(task: str, cfg: PipelineConfig, tune: TuneConfig,
             results: str | os.PathLike = 'results', *, device: str = 'cpu',
             force: bool = False, rerun_from: str | None = None, show_progress: bool = True,
             log: Any = print) -> dict[str, Any]:
    """Run (or resume) the tuning stages of `task`; returns tune.json's content."""
    import json

    from vdd_ros.sim.rollout import sealed_test_seeds
    ctx = Context(task, Path(results) / task, cfg, cfg.train_config(), device, show_progress,
                  log, eval_split='valid')
    stages = build_tune_stages(ctx, tune)
    check_stage_name(rerun_from, stages)
    check_writable(ctx.folder, 'results folder', folder=True)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    with task_lock(ctx.folder), sealed_test_seeds():
        remove_stale_temporaries(ctx.folder)
        run_stages(ctx, stages, force, rerun_from)
    log(f'tuning report: {ctx.path("tune/tune.md")}')
    return json.loads(ctx.path('tune/tune.json').read_text())

