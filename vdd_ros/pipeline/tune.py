"""`vdd-ros tune`: candidate settings of the VDD-MoE, each scored on validation seeds only.

The candidates (config/tune.yaml) are dotted training overrides. In the task's results
folder, next to the pipeline's stages and sharing its cached data and teachers (a candidate
that changes `teacher.*` trains its own), each candidate gets, for every training seed of the
pipeline config (`seeds`: the first alone by default, `--set seeds=3` for three)

    tune/<candidate>[/seed_<s>]/vdd_moe -> .../eval_vdd_moe (validation seeds, in process)

(the first seed's outputs directly in tune/<candidate>). Each seed's teacher and consistency
student (the pipeline's own, shared with it) are scored on the same validation seeds
(seed_<s>/eval_valid/<kind>.json) as references, and `tune/report` writes tune/tune.json,
tune/tune.md and tune/candidates.png: validation success, mode entropy (95% intervals over
seeds and rollouts) and the rarest mode's share, per candidate and per reference, whether each
candidate meets the targets against the teacher, and whether its mode entropy is above
consistency distillation's with success within 0.05 of it or better. Each candidates
file is one study, reported under its file name: tune_modes.yaml -> `tune/tune_modes_report`,
tune/tune_modes.{json,md} and tune/tune_modes.png. This is both the tuning protocol
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
from vdd_ros.pipeline.stages import _evaluate, data_stages, episode_settings, training_stage
from vdd_ros.policies import POLICY_KINDS, STUDENT, TEACHER
from vdd_ros.report import (CONSISTENCY, CONSISTENCY_MARGIN, COVERAGE, COVERAGE_MODES,
                             ENTROPY_FRACTION, SUCCESS_MARGIN, difference_text)

CANDIDATE_NAME = 'candidate names are letters, digits and _'
VALID_EVAL = 'eval_valid'        # a seed's folder for its references' validation evaluations
REFERENCES = (TEACHER, CONSISTENCY)   # the kinds every candidate is compared with


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


def report_files(study: str) -> tuple[str, list[str]]:
    """The report stage of a study (its candidates file's name) and its outputs."""
    if study == 'tune':
        return 'tune/report', ['tune/tune.json', 'tune/tune.md', 'tune/candidates.png']
    return f'tune/{study}_report', [f'tune/{study}.{ext}' for ext in ('json', 'md', 'png')]


def build_tune_stages(ctx: Context, tune: TuneConfig, study: str = 'tune') -> list[Stage]:
    """The data stage, the references (teacher, consistency student) and their validation
    evaluations, each candidate's VDD-MoE and its validation evaluation for every training
    seed, and the study's report."""
    stages = data_stages(ctx)
    data = stages[-1].name
    teacher = POLICY_KINDS[TEACHER]
    for seed in ctx.seeds:
        for name in references(ctx):
            stages.append(training_stage(ctx, POLICY_KINDS[name], seed, data, seed_dir(seed)))
        for name in references(ctx):
            stages.append(Stage(
                reference_eval_stage(seed, name), f'validation episodes: {name}, seed {seed}',
                (data, f'{seed_dir(seed)}/{name}'), [reference_eval_file(seed, name)],
                episode_settings(ctx, name, 'valid'),
                functools.partial(_evaluate, name, prefix=seed_dir(seed), ros=False,
                                  folder=VALID_EVAL)))
    for name, overrides in tune.candidates.items():
        own_teacher = any(k.startswith(f'{TEACHER}.') for k in overrides)
        for seed in ctx.seeds:
            prefix = candidate_dir(ctx, name, seed)
            if own_teacher:
                stages.append(training_stage(ctx, teacher, seed, data, prefix, overrides))
            source = f'{prefix}/{TEACHER}' if own_teacher else f'{seed_dir(seed)}/{TEACHER}'
            stages.append(training_stage(ctx, POLICY_KINDS[STUDENT], seed, data, prefix,
                                         overrides, teacher=source))
            stages.append(Stage(
                f'{prefix}/eval_{STUDENT}', f'validation episodes: {name}, seed {seed}',
                (data, f'{prefix}/{STUDENT}'), [f'{prefix}/eval/{STUDENT}.json'],
                episode_settings(ctx, STUDENT, 'valid'),
                functools.partial(_evaluate, STUDENT, prefix=prefix, ros=False)))
    name, outputs = report_files(study)
    stages.append(Stage(name, 'tuning report', tuple(s.name for s in stages), outputs,
                        {'candidates': tune.candidates},
                        functools.partial(_tune_report, tune, outputs)))
    return stages


def references(ctx: Context) -> list[str]:
    """The kinds scored beside the candidates: the teacher, and consistency distillation
    unless the run leaves it out (`policies`)."""
    return [k for k in REFERENCES if k == TEACHER or k in ctx.cfg.kinds()]


def reference_eval_stage(seed: int, name: str = TEACHER) -> str:
    """The validation evaluation of a training seed's reference `name` (shared by the
    studies; a candidate with its own teacher.* settings is still judged against the shared
    teacher)."""
    return f'{seed_dir(seed)}/{VALID_EVAL}_{name}'


def reference_eval_file(seed: int, name: str = TEACHER) -> str:
    return f'{seed_dir(seed)}/{VALID_EVAL}/{name}.json'


def candidate_dir(ctx: Context, name: str, seed: int) -> str:
    """Where a candidate's models and evaluations of one training seed go: tune/<name> for
    the first seed, tune/<name>/seed_<s> for later ones."""
    return f'tune/{name}' if seed == ctx.seeds[0] else f'tune/{name}/{seed_dir(seed)}'


def rarest_mode_share(runs: list[Mapping[str, Any]], modes: list[str]) -> float | None:
    """The smallest share of a mode among the successful rollouts of `runs`, pooled."""
    won = [d['mode'] for run in runs for d in run['episodes_detail'] if d['success']]
    if not modes or not won:
        return None
    return min(won.count(m) for m in modes) / len(won)


def _tune_report(tune: TuneConfig, outputs: list[str], ctx: Context) -> dict[str, Any]:
    import json

    from vdd_ros.report import interval_summary, plot_candidates, versus_consistency
    modes = ctx.modes()

    def read(files: list[str]) -> list[dict[str, Any]]:
        return [json.loads(ctx.path(f).read_text()) for f in files]

    def scored(evs: list[dict[str, Any]]) -> dict[str, Any]:
        return {**interval_summary(evs, modes), 'rarest_mode_share': rarest_mode_share(evs, modes)}

    ref_runs = {name: read([reference_eval_file(s, name) for s in ctx.seeds])
                for name in references(ctx)}
    refs = {name: scored(evs) for name, evs in ref_runs.items()}
    teacher, consistency = refs[TEACHER], refs.get(CONSISTENCY)
    rows = []
    for name, overrides in tune.candidates.items():
        evs = read([f'{candidate_dir(ctx, name, s)}/eval/{STUDENT}.json' for s in ctx.seeds])
        r = {'candidate': name, 'overrides': overrides, **scored(evs)}
        r['meets_targets'] = meets_targets(r, teacher, len(modes))
        r['versus_consistency'] = None
        if consistency is not None and modes:
            r['versus_consistency'] = versus_consistency(
                {STUDENT: r, CONSISTENCY: consistency},
                {STUDENT: evs, CONSISTENCY: ref_runs[CONSISTENCY]}, modes)
        rows.append(r)
    best = max(rows, key=lambda r: (round(r['success_rate'], 6), r['mode_entropy'] or 0.0))
    result = {'task': ctx.task, 'split': 'valid', 'episodes': ctx.cfg.eval_episodes,
              'training_seeds': ctx.seeds, 'teacher': teacher, 'consistency': consistency,
              'rows': rows, 'best': best['candidate']}
    json_file, md_file, png_file = outputs
    write_json(ctx.path(json_file), result)
    write_text(ctx.path(md_file), tune_markdown(result, Path(png_file).name))
    plot_candidates(result, ctx.path(png_file))
    for r in rows:
        ctx.log(f"  {r['candidate']:<20} success {r['success_rate']:.2f} "
                f"[{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}]"
                + (f", entropy {r['mode_entropy']:.2f}" if r['mode_entropy'] is not None
                   else ''))
    return {'best': best['candidate']}


def meets_targets(row: Mapping[str, Any], teacher: Mapping[str, Any], n_modes: int) -> bool:
    """Whether a candidate meets the report's targets on the validation seeds: mean success
    at least the teacher's minus SUCCESS_MARGIN, mode entropy at least ENTROPY_FRACTION of
    the teacher's and, with COVERAGE_MODES modes or more, every mode at least COVERAGE of
    the successful rollouts."""
    tol = 1e-12
    if row['success_rate'] < teacher['success_rate'] - SUCCESS_MARGIN - tol:
        return False
    if teacher['mode_entropy'] is not None and (
            row['mode_entropy'] is None
            or row['mode_entropy'] < ENTROPY_FRACTION * teacher['mode_entropy'] - tol):
        return False
    return n_modes < COVERAGE_MODES or (row['rarest_mode_share'] or 0.0) >= COVERAGE - tol


def yaml_text(value: Any) -> str:
    """An override's value as the candidates file writes it (`null`, `true`, `[0.2, 0.5]`)."""
    import json
    return value if isinstance(value, str) else json.dumps(value).replace('"', '')


def tune_markdown(result: Mapping[str, Any], plot: str = 'candidates.png') -> str:
    """tune.md: the teacher's and the candidates' validation scores, and whether each
    candidate meets the targets against the teacher."""
    def cells(r: Mapping[str, Any]) -> str:
        ent = '-' if r['mode_entropy'] is None else \
            f"{r['mode_entropy']:.2f} [{r['entropy_ci'][0]:.2f}, {r['entropy_ci'][1]:.2f}]"
        rare = r.get('rarest_mode_share')
        return (f"{r['success_rate']:.2f} [{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}]"
                f" | {ent} | " + ('-' if rare is None else f'{rare:.0%}'))

    teacher, consistency = result.get('teacher'), result.get('consistency')
    versus = consistency is not None and consistency['mode_entropy'] is not None
    lines = ['| candidate | overrides | validation success [95% CI] | mode entropy [95% CI] '
             '| rarest mode | targets |' + (' above consistency |' if versus else ''),
             '|---|---|---|---|---|---|' + ('---|' if versus else '')]
    blank = ' |' if versus else ''
    if teacher is not None:
        lines.append(f'| *teacher* | (reference) | {cells(teacher)} | |' + blank)
    if consistency is not None:
        lines.append(f'| *consistency* | (reference) | {cells(consistency)} | |' + blank)
    for r in result['rows']:
        over = ', '.join(f'`{k}={yaml_text(v)}`' for k, v in r['overrides'].items()) \
            or '(defaults)'
        met = {True: 'met', False: 'missed', None: '-'}[r.get('meets_targets')]
        vs = r.get('versus_consistency')
        above = '' if not versus else ' -' if vs is None else \
            f" {'yes' if vs['met'] else 'no'}" + (f' (entropy {difference_text(vs)})'
                                                   if vs.get('difference_ci') else '')
        lines.append(f"| {r['candidate']} | {over} | {cells(r)} | {met} |" +
                     (f'{above} |' if versus else ''))
    seeds = result.get('training_seeds', [result.get('training_seed')])
    where = (f'training seed {seeds[0]}; intervals: bootstrap over rollouts' if len(seeds) == 1
             else f'training seeds {", ".join(map(str, seeds))}; intervals: two-level '
                  f'bootstrap over the seeds, then each seed\'s rollouts')
    targets = '' if teacher is None else (
        f" A candidate meets the targets with a mean success of at least the teacher's minus "
        f"{SUCCESS_MARGIN} (here {teacher['success_rate'] - SUCCESS_MARGIN:.2f}), a mode "
        f"entropy of at least {ENTROPY_FRACTION} times the teacher's and, with "
        f"{COVERAGE_MODES} modes or more, every mode in at least {COVERAGE:.0%} of the "
        f"successful rollouts; the teacher is each training seed's own, on the same "
        f"validation seeds.")
    if versus:
        targets += (" *Above consistency*: a mode entropy above consistency distillation's "
                    f"(each seed's own student), with a success of at least its minus "
                    f"{CONSISTENCY_MARGIN} (the report's comparison, on validation seeds); in "
                    f"brackets the entropy difference with its 95% interval (training seeds "
                    f"paired).")
    return (f"# Tuning the VDD-MoE on `{result['task']}` (validation seeds)\n\n"
            f"{result['episodes']} validation episodes per candidate and training seed (seeds "
            f"from 2000000; the test seeds are sealed while tuning), {where}. The rarest mode "
            f"is the smallest share of a mode among the successful rollouts, pooled over the "
            f"seeds.{targets} Highest validation success (then entropy): "
            f"**{result['best']}**.\n\n" + '\n'.join(lines) + f'\n\n![candidates]({plot})\n')


def run_tune(task: str, cfg: PipelineConfig, tune: TuneConfig,
             results: str | os.PathLike = 'results', *, device: str = 'cpu',
             force: bool = False, rerun_from: str | None = None, show_progress: bool = True,
             log: Any = print, study: str = 'tune') -> dict[str, Any]:
    """Run (or resume) the tuning stages of `task` for the study `study` (its candidates
    file's name); returns its JSON report's content."""
    import json

    from vdd_ros.sim.rollout import sealed_test_seeds
    ctx = Context(task, Path(results) / task, cfg, cfg.train_config(), device, show_progress,
                  log, eval_split='valid')
    stages = build_tune_stages(ctx, tune, study)
    check_stage_name(rerun_from, stages)
    check_writable(ctx.folder, 'results folder', folder=True)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    with task_lock(ctx.folder), sealed_test_seeds():
        remove_stale_temporaries(ctx.folder)
        run_stages(ctx, stages, force, rerun_from)
    json_file, md_file, _ = report_files(study)[1]
    log(f'tuning report: {ctx.path(md_file)}')
    return json.loads(ctx.path(json_file).read_text())

