"""Training jobs on a demonstration dataset: the code behind both the CLI and the ROS nodes.

Each job reads a robomimic-style HDF5 file (its train split, or with `filter_key` the demos of
`mask/<filter_key>`), trains one model with its one training loop and writes a checkpoint
folder (periodically while training, and at the end, also when stopped early through `stop`)
with the loss on the validation demos (`mask/valid`) as `valid_loss` when there are any.
Started by torchrun, a job trains data-parallel (distributed.py): every rank runs it, rank 0
alone writes. Every `checkpoint_every` iterations, and when stopped, the training state goes
to `<out>.state` (train_state.py); `resume` continues from it, with any number of ranks, and
a job that completes removes it.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from vdd_ros.core.baselines import train_em
from vdd_ros.core.checkpoint import load_model, read_meta, save_checkpoint, tail_mean
from vdd_ros.core.config import (BaselineConfig, MoEConfig, TrainConfig, from_dict, load_config,
                                 to_dict)
from vdd_ros.core.consistency import ConsistencyStudent, train_consistency
from vdd_ros.core.data import load_dataset, make_windows
from vdd_ros.core.fields import low_dim_fields
from vdd_ros.core.distributed import DataParallel, data_parallel
from vdd_ros.core.io import check_writable
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.policy import PolicySpec
from vdd_ros.core.progress import ProgressCallback
from vdd_ros.core.scores import TeacherScore
from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
from vdd_ros.core.train_state import TrainingState, fingerprint, state_folder
from vdd_ros.core.vdd import distill
from vdd_ros.core.windows import (CameraWindows, Windows, fit_observations, low_columns,
                                  normalize_low)
from vdd_ros.errors import UserError

Path_ = str | os.PathLike


@dataclass
class TrainingData:
    """Flat normalised windows of the training demos, ready for a training loop (camera
    demos: windows assembled per batch, windows.py)."""

    obs: Windows               # (N, obs_horizon * obs_dim)
    actions: torch.Tensor      # (N, action_horizon * action_dim)
    spec: PolicySpec
    valid_obs: Windows | None = None           # the validation demos' windows, alike
    valid_actions: torch.Tensor | None = None


def load_train_config(config: Path_ | None = None,
                      overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults) with dotted-key overrides applied."""
    if config is not None:
        return load_config(TrainConfig, config, overrides)
    from vdd_ros.core.config import apply_overrides
    return from_dict(TrainConfig, apply_overrides(to_dict(TrainConfig()), overrides or {}),
                     'overrides')


def prepare_data(dataset: Path_, cfg: TrainConfig, model: torch.nn.Module,
                 obs_keys: list[str] | None = None, fit: bool = True,
                 filter_key: str | None = None) -> TrainingData:
    """Windows of the dataset's training demos (and of its validation demos), normalised by
    `model`'s normalizers.

    With `fit`, the normalizers are first fitted to the training data (observations
    standardised, actions mapped to [-1, 1]).
    """
    data = load_dataset(dataset, obs_keys, filter_key=filter_key)
    demos = [data.demos[i] for i in data.train_idx] or data.demos
    if not demos:
        raise UserError(f'{dataset}: contains no demonstrations')
    steps = sum(len(d) for d in demos)
    if fit and steps < 2:
        raise UserError(f'{dataset}: the training demos ({", ".join(_names(demos))}) hold '
                        f'{steps} time step in all; fitting the normalisers needs at least 2')
    fields = data.obs_fields
    obs, act = make_windows(demos, cfg.obs_horizon, cfg.action_horizon)
    obs_t, act_t = torch.as_tensor(obs).float(), torch.as_tensor(act).float()
    if fit:
        fit_observations(model.obs_normalizer, obs_t, fields)
        model.action_normalizer.fit(act_t, 'minmax')
    _check_normalised(dataset, demos, fields, model)

    def windows(chosen: list[Any], low: torch.Tensor) -> torch.Tensor | CameraWindows:
        low = normalize_low(model.obs_normalizer, low, fields)
        if data.cameras:
            return CameraWindows(chosen, fields, cfg.obs_horizon, low)
        return low.reshape(len(low), -1)
    obs_w = windows(demos, obs_t)
    act_t = model.action_normalizer.normalize(act_t).reshape(len(act_t), -1)
    valid = [data.demos[i] for i in data.valid_idx if i not in set(data.train_idx)]
    v_obs = v_act = None
    if valid:
        vo, va = make_windows(valid, cfg.obs_horizon, cfg.action_horizon)
        v_obs = windows(valid, torch.as_tensor(vo).float())
        v_act = model.action_normalizer.normalize(torch.as_tensor(va).float()) \
            .reshape(len(va), -1)
    task = data.env_args.get('task') if isinstance(data.env_args, dict) else None
    spec = PolicySpec(obs_fields=list(data.obs_fields), action_dim=data.action_dim,
                      obs_horizon=cfg.obs_horizon, action_horizon=cfg.action_horizon,
                      action_exec=cfg.action_exec, task=task)
    return TrainingData(obs_w, act_t, spec, v_obs, v_act)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: TrainingData) -> float | None:
    """The model's training loss on the validation windows (the teacher: its denoising loss
    with fixed noise draws; an MoE: the negative log-likelihood of the actions), or None."""
    if data.valid_obs is None:
        return None
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    total, count = 0.0, 0
    n = len(data.valid_actions)
    chunk = 4096 if isinstance(data.valid_obs, torch.Tensor) else 256
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        obs, act = data.valid_obs[rows].to(device), data.valid_actions[rows].to(device)
        loss = model.loss(act, obs, generator=gen) if model.kind == 'teacher' else \
            -model.log_prob(act, model.condition(obs)).mean()
        total += float(loss) * len(obs)
        count += len(obs)
    model.train(was)
    return total / count


def _names(demos: list[Any]) -> list[str]:
    return [d.name or f'demo {i}' for i, d in enumerate(demos)]


def _check_normalised(dataset: Path_, demos: list[Any], fields: list[tuple[str, int]],
                      model: torch.nn.Module) -> None:
    """Every demo's observations and actions stay finite once normalised; else a UserError
    naming the demo, the key and the step (a normaliser that cannot represent the data)."""
    keys = [key for key, size in low_dim_fields(fields) for _ in range(size)]
    cols = low_columns(fields)
    obs_norm = model.obs_normalizer
    for name, demo in zip(_names(demos), demos):
        for part, values, offset, scale in (
                ('obs', demo.obs, obs_norm.offset[cols], obs_norm.scale[cols]),
                ('actions', demo.actions, model.action_normalizer.offset,
                 model.action_normalizer.scale)):
            with torch.no_grad():
                out = (torch.as_tensor(values, dtype=torch.float32) - offset) / scale
            bad = (~torch.isfinite(out)).nonzero()
            if len(bad):
                t, i = (int(v) for v in bad[0])
                where = f'{name}/obs/{keys[i]}' if part == 'obs' else f'{name}/actions'
                raise UserError(f'{dataset}: {where}: value {float(values[t, i]):g} at step '
                                f'{t} is not finite once normalised (normaliser offset '
                                f'{float(offset[i]):g}, scale {float(scale[i]):g})')


def _dims(dataset: Path_, obs_keys: list[str] | None, filter_key: str | None = None
          ) -> tuple[int, int, list[tuple[str, int]]]:
    """The dataset's observation size, action size and observation fields."""
    data = load_dataset(dataset, obs_keys, filter_key=filter_key)
    return sum(n for _, n in data.obs_fields), data.action_dim, list(data.obs_fields)


def train_teacher_job(dataset: Path_, out: Path_, config: Path_ | None = None, *,
                      overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                      obs_keys: list[str] | None = None, filter_key: str | None = None,
                      progress: ProgressCallback | None = None,
                      stop: threading.Event | None = None, show_bar: bool = True,
                      checkpoint_every: int = 1000, resume: bool = False) -> Path:
    """Train the diffusion teacher on `dataset` and write its checkpoint to `out`."""
    check_writable(out, 'checkpoint folder', folder=True)
    cfg = load_train_config(config, overrides)
    with data_parallel(device) as dp:
        torch.manual_seed(cfg.seed)
        obs_dim, action_dim, fields = _dims(dataset, obs_keys, filter_key)
        teacher = DiffusionTeacher(cfg.teacher, obs_dim, action_dim, cfg.obs_horizon,
                                   cfg.action_horizon, fields=fields, vision=cfg.vision)
        data = prepare_data(dataset, cfg, teacher, obs_keys, filter_key=filter_key)
        teacher.to(dp.device)
        obs, actions = data.obs.to(dp.device), data.actions.to(dp.device)
        state = _training_state(out, 'teacher', cfg, ('teacher',), checkpoint_every, resume,
                                dp, obs, actions)
        save = _saver(out, data, 'teacher', cfg, dp)
        history = train_teacher(teacher, obs, actions, seed=cfg.seed, progress=progress,
                                stop=stop, show_bar=show_bar, on_checkpoint=save,
                                checkpoint_every=checkpoint_every, dp=dp, state=state)
        path = save(teacher, history)
        if len(history) >= cfg.teacher.iterations:
            state.finish()
    return path


WARM_START = 'vdd warm start (EM)'


def distill_job(teacher_ckpt: Path_, dataset: Path_, out: Path_, config: Path_ | None = None, *,
                overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                progress: ProgressCallback | None = None, stop: threading.Event | None = None,
                show_bar: bool = True, checkpoint_every: int = 1000,
                resume: bool = False, filter_key: str | None = None) -> Path:
    """Distil a teacher checkpoint into a VDD-MoE on the dataset's states; write to `out`.

    Stopped during the EM warm start, it writes the warm-started MoE and leaves distillation
    to a resumed run.
    """
    check_writable(out, 'checkpoint folder', folder=True)
    cfg = load_train_config(config, overrides)
    meta = read_meta(teacher_ckpt)
    if meta['kind'] != 'teacher':
        raise UserError(f'{teacher_ckpt}: a {meta["kind"]} checkpoint (method '
                        f'{meta.get("method")}); distillation needs a diffusion teacher '
                        f'checkpoint (kind teacher)')
    with data_parallel(device) as dp:
        torch.manual_seed(cfg.seed)
        teacher, spec, _ = load_model(teacher_ckpt, dp.device)
        cfg.obs_horizon, cfg.action_horizon = spec.obs_horizon, spec.action_horizon
        cfg.action_exec = spec.action_exec
        # the teacher's encoder architecture (its weights too, unless moe_encoder is own)
        vision = dataclasses.replace(teacher.encoder.cfg, moe_encoder=cfg.vision.moe_encoder)
        moe = MixtureOfExperts(cfg.moe, spec.obs_dim, spec.action_dim, spec.obs_horizon,
                               spec.action_horizon, fields=spec.obs_fields, vision=vision)
        moe.obs_normalizer.load_state_dict(teacher.obs_normalizer.state_dict())
        moe.action_normalizer.load_state_dict(teacher.action_normalizer.state_dict())
        own = teacher.encoder.has_cameras and cfg.vision.moe_encoder == 'own'
        if not own:
            moe.encoder.load_state_dict(teacher.encoder.state_dict())
            moe.encoder.requires_grad_(False)          # the teacher's encoder, frozen
        keys = _check_like_teacher(dataset, spec, filter_key)
        data = prepare_data(dataset, cfg, moe, keys, fit=False, filter_key=filter_key)
        gen = torch.Generator().manual_seed(cfg.seed)
        moe.init_means(data.actions, gen)
        moe.to(dp.device)
        data.spec.task = spec.task
        # the score reads the teacher's conditions (the windows themselves without cameras);
        # so does the MoE, unless it trains its own encoders on the windows
        windows = data.obs.to(dp.device)
        obs = conditions(teacher, windows, show_bar and dp.is_main)
        actions = data.actions.to(dp.device)
        warm = cfg.vdd.init_em_iterations
        stages = (WARM_START, 'vdd') if warm else ('vdd',)
        state = _training_state(out, 'vdd_moe', cfg, stages, checkpoint_every, resume, dp,
                                obs, actions, *teacher.state_dict().values())
        save = _saver(out, data, 'vdd_moe', cfg, dp)
        if warm:
            bcfg = BaselineConfig(
                iterations=warm, batch_size=cfg.vdd.batch_size, lr=cfg.vdd.init_em_lr,
                responsibility_min_std=cfg.vdd.init_em_responsibility_min_std,
                final_min_std=cfg.vdd.init_em_final_min_std)
            train_em(moe, windows if own else obs, actions, bcfg, seed=cfg.seed,
                     stage=WARM_START, progress=progress, stop=stop, show_bar=show_bar, dp=dp,
                     state=state, condition=moe.condition if own else None)
            if dp.should_stop(stop is not None and stop.is_set()):
                return save(moe)
        moe.set_min_std(cfg.vdd.min_std if cfg.vdd.min_std is not None else cfg.moe.min_std)
        history = distill(moe, TeacherScore(teacher), obs, actions, cfg.vdd, seed=cfg.seed,
                          progress=progress, stop=stop, show_bar=show_bar, on_checkpoint=save,
                          checkpoint_every=checkpoint_every, dp=dp, state=state,
                          windows=windows if own else None)
        path = save(moe, history)
        if len(history) >= cfg.vdd.iterations:
            state.finish()
    return path


def baseline_job(method: str, dataset: Path_, out: Path_, config: Path_ | None = None, *,
                 overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                 obs_keys: list[str] | None = None, progress: ProgressCallback | None = None,
                 stop: threading.Event | None = None, show_bar: bool = True,
                 checkpoint_every: int = 1000, resume: bool = False,
                 filter_key: str | None = None) -> Path:
    """Train `gaussian_bc` (one Gaussian) or `em_moe` (MoE by EM) on the data; write to `out`.

    `checkpoint_every` sets how often the training state is saved (for `resume`).
    """
    if method not in ('gaussian_bc', 'em_moe'):
        raise UserError(f"baseline method must be 'gaussian_bc' or 'em_moe', got {method!r}")
    check_writable(out, 'checkpoint folder', folder=True)
    cfg = load_train_config(config, overrides)
    with data_parallel(device) as dp:
        torch.manual_seed(cfg.seed)
        obs_dim, action_dim, fields = _dims(dataset, obs_keys, filter_key)
        experts = 1 if method == 'gaussian_bc' else cfg.moe.num_experts
        mcfg = MoEConfig(**{**to_dict(cfg.moe), 'num_experts': experts})
        moe = MixtureOfExperts(mcfg, obs_dim, action_dim, cfg.obs_horizon, cfg.action_horizon,
                               fields=fields, vision=cfg.vision)
        data = prepare_data(dataset, cfg, moe, obs_keys, filter_key=filter_key)
        moe.init_means(data.actions, torch.Generator().manual_seed(cfg.seed))
        moe.to(dp.device)
        obs, actions = data.obs.to(dp.device), data.actions.to(dp.device)
        bcfg = getattr(cfg, method)
        state = _training_state(out, method, cfg, (method,), checkpoint_every, resume, dp,
                                obs, actions)
        history = train_em(moe, obs, actions, bcfg, seed=cfg.seed, stage=method,
                           progress=progress, stop=stop, show_bar=show_bar, dp=dp, state=state,
                           condition=moe.condition)
        path = _saver(out, data, method, cfg, dp)(moe, history)
        if len(history) >= bcfg.iterations:
            state.finish()
    return path


@torch.no_grad()
def conditions(teacher: DiffusionTeacher, obs: Windows, show_bar: bool = False,
               chunk: int = 256) -> torch.Tensor:
    """The teacher's conditions `encode(obs)` of every window (eval mode: no augmentation);
    a tensor of windows without cameras is its own condition."""
    if isinstance(obs, torch.Tensor):
        return obs
    was = teacher.training
    teacher.eval()
    n = len(obs)
    out = []
    for start in tqdm(range(0, n, chunk), desc='encode windows', disable=not show_bar,
                      leave=False, dynamic_ncols=True):
        out.append(teacher.encode(obs[torch.arange(start, min(start + chunk, n))]))
    teacher.train(was)
    return torch.cat(out)


def _check_like_teacher(dataset: Path_, spec: PolicySpec,
                        filter_key: str | None = None) -> list[str]:
    """The teacher's observation keys, once the dataset is checked to have the teacher's
    observations and action size (else a UserError naming both)."""
    keys = [k for k, _ in spec.obs_fields]
    found = load_dataset(dataset, keys, filter_key=filter_key)
    wanted = [(k, int(n)) for k, n in spec.obs_fields]
    if found.obs_fields != wanted or found.action_dim != spec.action_dim:
        raise UserError(f'{dataset}: observations {found.obs_fields} and '
                        f'{found.action_dim}-d actions do not match the teacher\'s '
                        f'{wanted} and {spec.action_dim}-d')
    return keys


def _training_state(out: Path_, job: str, cfg: TrainConfig, stages: tuple[str, ...],
                    every: int, resume: bool, dp: DataParallel,
                    *data: Windows) -> TrainingState:
    """The training state of a job writing `out`, identified by its config and its data."""
    tensors = [t for d in data for t in (d.tensors() if isinstance(d, CameraWindows) else (d,))]
    run = {'job': job, 'config': to_dict(cfg), 'data': fingerprint(*tensors)}
    dp.check_same(run['data'], 'the training data')
    return TrainingState(state_folder(out), every=every, run=run, stages=stages,
                         resume=resume, dp=dp)


def _saver(out: Path_, data: TrainingData, method: str, cfg: TrainConfig,
           dp: DataParallel | None = None):
    """A callback that writes the model as a checkpoint folder: the iteration count, final
    loss and validation loss in its config, the loss curve in its curves file. Only rank 0
    writes."""
    spec = data.spec

    def save(model: torch.nn.Module, history: list[tuple[int, float]] | None = None) -> Path:
        if dp is not None and not dp.is_main:
            return Path(out)
        if not history:
            return save_checkpoint(out, model, spec, method, to_dict(cfg))
        metrics = {'iterations': len(history), 'final_loss': tail_mean(history)}
        valid = validation_loss(model, data)
        if valid is not None:
            metrics['valid_loss'] = valid
        return save_checkpoint(out, model, spec, method, to_dict(cfg), metrics,
                               {'loss_history': history})
    return save


def consistency_job(teacher_ckpt: Path_, dataset: Path_, out: Path_, config: Path_ | None = None,
                    *, overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                    progress: ProgressCallback | None = None,
                    stop: threading.Event | None = None, show_bar: bool = True,
                    checkpoint_every: int = 1000, resume: bool = False,
                    filter_key: str | None = None) -> Path:
    """Consistency-distil a teacher checkpoint into a one-step student (consistency.py) on the
    dataset's windows; write it to `out` (kind consistency, method consistency).

    The student has the teacher's network, noise range and normalizers and starts from the
    teacher's weights. Its checkpoint has no `valid_loss`: the consistency loss needs the
    teacher, and a one-step sampler has no likelihood.
    """
    check_writable(out, 'checkpoint folder', folder=True)
    cfg = load_train_config(config, overrides)
    meta = read_meta(teacher_ckpt)
    if meta['kind'] != 'teacher':
        raise UserError(f'{teacher_ckpt}: a {meta["kind"]} checkpoint (method '
                        f'{meta.get("method")}); consistency distillation needs a diffusion '
                        f'teacher checkpoint (kind teacher)')
    with data_parallel(device) as dp:
        torch.manual_seed(cfg.seed)
        teacher, spec, _ = load_model(teacher_ckpt, dp.device)
        cfg.obs_horizon, cfg.action_horizon = spec.obs_horizon, spec.action_horizon
        cfg.action_exec = spec.action_exec
        student = ConsistencyStudent(dataclasses.replace(teacher.cfg, sampling_steps=1),
                                     spec.obs_dim, spec.action_dim, spec.obs_horizon,
                                     spec.action_horizon, fields=spec.obs_fields,
                                     vision=teacher.encoder.cfg).to(dp.device)
        student.load_state_dict(teacher.state_dict())     # normalizers, encoder and network
        keys = _check_like_teacher(dataset, spec, filter_key)
        data = prepare_data(dataset, cfg, student, keys, fit=False, filter_key=filter_key)
        data = dataclasses.replace(data, valid_obs=None, valid_actions=None)
        data.spec.task = spec.task
        # the student keeps the teacher's encoder (trained: the network only) and learns on
        # the teacher's conditions
        obs = conditions(teacher, data.obs.to(dp.device), show_bar and dp.is_main)
        actions = data.actions.to(dp.device)
        state = _training_state(out, 'consistency', cfg, ('consistency',), checkpoint_every,
                                resume, dp, obs, actions, *teacher.state_dict().values())
        save = _saver(out, data, 'consistency', cfg, dp)
        history = train_consistency(student, teacher, obs, actions, cfg.consistency,
                                    seed=cfg.seed, progress=progress, stop=stop,
                                    show_bar=show_bar, on_checkpoint=save,
                                    checkpoint_every=checkpoint_every, dp=dp, state=state)
        path = save(student, history)
        if len(history) >= cfg.consistency.iterations:
            state.finish()
    return path
