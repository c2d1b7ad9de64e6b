"""The registry of policy kinds: one entry per kind, from which everything else is built.

A `PolicyKind` is a model the pipeline trains (its training stage, checkpoint folder, job,
the TrainConfig sections that key its stage, its curve title) together with the evaluations
run from its checkpoint (the teacher at several sampling steps, say). The pipeline's stages,
the report's tables and plots, the CLI help and the checkpoint checks read this registry, so
adding a method is one `register(...)` call here and its own module (as robomimic registers
its algorithms). Jobs are imported when they run, so reading the registry imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vdd_ros.errors import UserError

# job(teacher checkpoint or None, dataset, out folder, **common job keywords) -> checkpoint
Job = Callable[..., Path]


@dataclass(frozen=True)
class Evaluation:
    """One evaluated policy: `eval/<name>.json`, stage `eval_<name>`."""

    name: str
    label: str                 # report tables
    short: str                 # plot tick labels
    steps: int | None = None   # teacher sampling steps (None: the checkpoint's own)


@dataclass(frozen=True)
class PolicyKind:
    """One trained model and the evaluations made from it."""

    name: str                         # training stage and checkpoint folder
    title: str                        # what its training stage does
    model_kind: str                   # the checkpoint's `kind` (core/checkpoint.py)
    role: str                         # 'teacher', 'student' (distilled) or 'baseline'
    sections: tuple[str, ...]         # TrainConfig sections that key its training stage
    curve_title: str
    job: Job
    evaluations: tuple[Evaluation, ...]
    needs_teacher: bool = False       # trained from the teacher's checkpoint

    def train(self, demos: Path, out: Path, teacher: Path | None = None, **common: Any) -> Path:
        """Run the training job (`common`: overrides, device, show_bar, ...)."""
        return self.job(teacher, demos, out, **common)


POLICY_KINDS: dict[str, PolicyKind] = {}
EVALUATIONS: dict[str, tuple[Evaluation, PolicyKind]] = {}


def register(kind: PolicyKind) -> PolicyKind:
    """Add a kind; names of kinds and evaluations are unique across the registry."""
    names = [kind.name] + [e.name for e in kind.evaluations if e.name != kind.name]
    for name in names:
        if name in POLICY_KINDS or name in EVALUATIONS:
            raise ValueError(f'policy name {name!r} is registered twice')
    if kind.role not in ('teacher', 'student', 'baseline'):
        raise ValueError(f'{kind.name}: unknown role {kind.role!r}')
    POLICY_KINDS[kind.name] = kind
    for evaluation in kind.evaluations:
        EVALUATIONS[evaluation.name] = (evaluation, kind)
    return kind



def evaluations() -> list[tuple[Evaluation, PolicyKind]]:
    """Every evaluation with its kind, in report order (registration order)."""
    return list(EVALUATIONS.values())


def get_kind(name: str) -> PolicyKind:
    try:
        return POLICY_KINDS[name]
    except KeyError:
        raise UserError(f'unknown policy kind {name!r} (known: '
                        f'{", ".join(POLICY_KINDS)})') from None


def kind_of_evaluation(name: str) -> PolicyKind:
    return EVALUATIONS[name][1]


def check_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """The checkpoint's metadata, or one UserError when it is not a `kind` checkpoint."""
    from vdd_ros.core.checkpoint import read_meta
    meta = read_meta(path)
    wanted = get_kind(kind).model_kind
    if meta.get('kind') != wanted:
        raise UserError(f'{path}: a {meta.get("kind")} checkpoint (method '
                        f'{meta.get("method")}); {kind} needs a {wanted} checkpoint')
    return meta


# -- the kinds --------------------------------------------------------------------------------
def _teacher_job(teacher: Path | None, demos: Path, out: Path, **common: Any) -> Path:
    from vdd_ros.core.jobs import train_teacher_job
    return train_teacher_job(demos, out, **common)


def _vdd_job(teacher: Path | None, demos: Path, out: Path, **common: Any) -> Path:
    from vdd_ros.core.jobs import distill_job
    return distill_job(teacher, demos, out, **common)


def _consistency_job(teacher: Path | None, demos: Path, out: Path, **common: Any) -> Path:
    from vdd_ros.core.jobs import consistency_job
    return consistency_job(teacher, demos, out, **common)


def _baseline_job(method: str) -> Job:
    def job(teacher: Path | None, demos: Path, out: Path, **common: Any) -> Path:
        from vdd_ros.core.jobs import baseline_job
        return baseline_job(method, demos, out, **common)
    return job


register(PolicyKind(
    'teacher', 'train the diffusion teacher', 'teacher', 'teacher', ('teacher',),
    'diffusion teacher (denoising loss)', _teacher_job, (
        Evaluation('teacher', 'diffusion teacher', 'teacher'),
        Evaluation('teacher_4step', 'diffusion teacher, 4 steps', 'teacher\n4 steps', 4),
        Evaluation('teacher_2step', 'diffusion teacher, 2 steps', 'teacher\n2 steps', 2),
        Evaluation('teacher_1step', 'diffusion teacher, 1 step', 'teacher\n1 step', 1))))
register(PolicyKind(
    'vdd_moe', 'distil the VDD-MoE', 'moe', 'student', ('moe', 'vdd'),
    'VDD-MoE (distillation bound)', _vdd_job,
    (Evaluation('vdd_moe', 'VDD-MoE', 'VDD-MoE'),), needs_teacher=True))
register(PolicyKind(
    'consistency', 'distil the consistency student', 'consistency', 'student',
    ('consistency',), 'consistency distillation (consistency loss)', _consistency_job,
    (Evaluation('consistency', 'consistency distillation, 1 step', 'consistency\n1 step'),),
    needs_teacher=True))
register(PolicyKind(
    'gaussian_bc', 'train the Gaussian BC baseline', 'moe', 'baseline', ('moe', 'gaussian_bc'),
    'Gaussian BC (NLL)', _baseline_job('gaussian_bc'),
    (Evaluation('gaussian_bc', 'Gaussian BC', 'Gaussian\nBC'),)))
register(PolicyKind(
    'em_moe', 'train the EM-trained MoE baseline', 'moe', 'baseline', ('moe', 'em_moe'),
    'EM-trained MoE (NLL)', _baseline_job('em_moe'),
    (Evaluation('em_moe', 'EM-trained MoE', 'EM-MoE'),)))

# The model the report's targets are about, and the teacher it is measured against
STUDENT, TEACHER = 'vdd_moe', 'teacher'
BASELINES = tuple(k.name for k in POLICY_KINDS.values() if k.role == 'baseline')
