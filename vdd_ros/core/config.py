"""Validated dataclass configs.

Every config is a dataclass whose `validate()` raises `ConfigError` naming the bad field.
`from_dict` builds nested configs from plain dicts (YAML), rejects unknown keys and checks
types, so an error reads like `train.yaml: vdd.batch_size: must be >= 1, got 0`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from vdd_ros.errors import ConfigError

C = TypeVar('C')
INT_LIMIT = 2 ** 63   # integers must fit an int64 (seeds, counts)
_DECIMAL = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f'{name}: {msg}')


def positive(value: float, name: str) -> None:
    _check(value > 0 and math.isfinite(value), name, f'must be > 0, got {value}')


def at_least(value: float, low: float, name: str) -> None:
    _check(value >= low, name, f'must be >= {low}, got {value}')


def one_of(value: Any, choices: tuple, name: str) -> None:
    _check(value in choices, name, f'must be one of {list(choices)}, got {value!r}')


@dataclass
class TeacherConfig:
    """EDM-preconditioned (BESO-style) diffusion teacher."""

    hidden_dim: int = 256
    num_layers: int = 4
    sigma_data: float = 0.5
    sigma_min: float = 0.05
    sigma_max: float = 1.0
    rho: float = 7.0
    sampling_steps: int = 8
    sampler: str = 'euler'
    noise_mean: float = -1.2
    noise_std: float = 1.2
    # training
    iterations: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    ema_decay: float = 0.999

    def validate(self) -> None:
        for name in ('hidden_dim', 'num_layers', 'sampling_steps', 'iterations', 'batch_size'):
            at_least(getattr(self, name), 1, name)
        for name in ('sigma_data', 'sigma_min', 'sigma_max', 'rho', 'noise_std', 'lr'):
            positive(getattr(self, name), name)
        _check(self.sigma_min < self.sigma_max, 'sigma_min', 'must be below sigma_max')
        one_of(self.sampler, ('euler', 'heun'), 'sampler')
        _check(0.0 <= self.ema_decay < 1.0, 'ema_decay', f'must be in [0, 1), got '
               f'{self.ema_decay}')
        at_least(self.weight_decay, 0.0, 'weight_decay')


MOE_EXPERTS = ('independent', 'shared')


@dataclass
class MoEConfig:
    """Mixture of Gaussian experts and a gating network.

    `experts`: 'independent' gives every expert its own MLP (`num_layers` of `hidden_dim`) and
    the gating its own encoder of the observation (`num_layers` of `gating_hidden_dim`);
    'shared' (the only architecture of checkpoints written before the option) puts linear
    expert heads and a one-layer gating (`gating_hidden_dim`) on one backbone (`num_layers` of
    `hidden_dim`). Eight independent experts of width 128 have about the parameters of one
    shared backbone of width 256.
    """

    num_experts: int = 8
    hidden_dim: int = 128
    num_layers: int = 3
    gating_hidden_dim: int = 64
    covariance: str = 'diag'
    init_std: float = 0.5
    min_std: float = 0.05
    expert_mode: str = 'sample'
    experts: str = 'independent'

    def validate(self) -> None:
        for name in ('num_experts', 'hidden_dim', 'num_layers', 'gating_hidden_dim'):
            at_least(getattr(self, name), 1, name)
        one_of(self.experts, MOE_EXPERTS, 'experts')
        one_of(self.covariance, ('diag', 'full'), 'covariance')
        positive(self.init_std, 'init_std')
        positive(self.min_std, 'min_std')
        _check(self.init_std > self.min_std, 'init_std', 'must exceed min_std')
        check_expert_mode(self.expert_mode, self.num_experts, 'expert_mode')


EXPERT_MODES = ('sample', 'argmax', 'per_episode')


def is_integer(text: str) -> bool:
    """Whether `text` is a decimal integer in ASCII digits (`str.isdigit` also takes '²',
    which `int` refuses)."""
    return re.fullmatch(r'\s*-?[0-9]+\s*', text) is not None


def check_expert_mode(mode: str | int, num_experts: int, name: str = 'expert_mode') -> None:
    """`mode` is one of EXPERT_MODES or a pinned expert index (int or digit string)."""
    if isinstance(mode, str) and mode in EXPERT_MODES:
        return
    try:
        index = int(mode)
    except (TypeError, ValueError):
        raise ConfigError(f'{name}: must be one of {list(EXPERT_MODES)} or an expert index, '
                          f'got {mode!r}') from None
    _check(0 <= index < num_experts, name,
           f'pinned expert {index} out of range [0, {num_experts - 1}]')


VDD_OBJECTIVES = ('plain', 'smoothed')


@dataclass
class VDDConfig:
    """Variational Diffusion Distillation (per-expert upper bound, EM-style gating)."""

    iterations: int = 1500
    batch_size: int = 128
    samples_per_expert: int = 2
    expert_steps: int = 2
    gating_steps: int = 1
    lr: float = 1e-3
    gating_lr: float = 1e-3
    final_lr_fraction: float = 0.0
    score_sigma_min: float = 0.2
    score_sigma_max: float = 0.5
    # the gating is held uniform for this fraction of the iterations (helps on the toy; on
    # action chunks started from the EM warm start it collapsed modes, so it is off here)
    uniform_gating_fraction: float = 0.0
    grad_clip: float = 10.0
    # warm start: EM iterations on the dataset actions before distillation (0 = off)
    init_em_iterations: int = 1000
    init_em_lr: float = 1e-3
    # learning rate of the shared backbone (moe.experts 'shared') relative to the expert heads;
    # below 1 it keeps the experts of one mode from dragging the shared features (and the other
    # mode's experts) along, at some cost in precision (0 freezes the backbone of the warm
    # start). Independent experts share nothing: each one's MLP trains at the full rate
    backbone_lr_scale: float = 1.0
    # 'plain': the teacher's score at sigma on the student's own samples, taken as if already
    # noised (the paper's reference code); the student then matches the sigma-smoothed teacher
    # and comes out too wide. 'smoothed': the student smoothed by N(0, sigma^2 I) is matched to
    # the teacher at the same sigma, whose optimum is the unsmoothed teacher (vdd.py)
    objective: str = 'plain'
    # floor on the experts' std while distilling and in the distilled checkpoint (None: the
    # MoE's own, moe.min_std)
    min_std: float | None = 0.001
    # the warm start's E-step floor (BaselineConfig.responsibility_min_std): the gating learns
    # from responsibilities as if no expert were narrower, while the experts fit to their floor
    init_em_responsibility_min_std: float | None = None
    # the warm start's std floor annealed from moe.min_std to this value (BaselineConfig.
    # final_min_std): soft responsibilities first keep every mode, sharp ones at the end fit
    # the phases (None: moe.min_std throughout)
    init_em_final_min_std: float | None = 0.001

    def validate(self) -> None:
        one_of(self.objective, VDD_OBJECTIVES, 'objective')
        if self.min_std is not None:
            positive(self.min_std, 'min_std')
        if self.init_em_responsibility_min_std is not None:
            positive(self.init_em_responsibility_min_std, 'init_em_responsibility_min_std')
        if self.init_em_final_min_std is not None:
            positive(self.init_em_final_min_std, 'init_em_final_min_std')
        for name in ('iterations', 'batch_size', 'samples_per_expert', 'expert_steps'):
            at_least(getattr(self, name), 1, name)
        at_least(self.init_em_iterations, 0, 'init_em_iterations')
        at_least(self.backbone_lr_scale, 0.0, 'backbone_lr_scale')
        positive(self.init_em_lr, 'init_em_lr')
        at_least(self.gating_steps, 0, 'gating_steps')
        positive(self.lr, 'lr')
        positive(self.gating_lr, 'gating_lr')
        _check(0.0 <= self.final_lr_fraction <= 1.0, 'final_lr_fraction', 'must be in [0, 1]')
        positive(self.score_sigma_min, 'score_sigma_min')
        _check(self.score_sigma_min <= self.score_sigma_max, 'score_sigma_max',
               'must be >= score_sigma_min')
        _check(0.0 <= self.uniform_gating_fraction <= 1.0, 'uniform_gating_fraction',
               'must be in [0, 1]')
        positive(self.grad_clip, 'grad_clip')


@dataclass
class BaselineConfig:
    """Maximum-likelihood training of a Gaussian (Z=1) or an EM-trained MoE on the data."""

    iterations: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    final_lr_fraction: float = 0.0
    # floor on the experts' std in the E-step only (the responsibilities the gating is fitted
    # to); the experts themselves fit down to moe.min_std (None: no separate floor)
    responsibility_min_std: float | None = None
    # deterministic annealing of the experts' std floor: from moe.min_std at the first
    # iteration, geometrically, to this value at the last (None: moe.min_std throughout)
    final_min_std: float | None = None

    def validate(self) -> None:
        at_least(self.iterations, 1, 'iterations')
        at_least(self.batch_size, 1, 'batch_size')
        positive(self.lr, 'lr')
        _check(0.0 <= self.final_lr_fraction <= 1.0, 'final_lr_fraction', 'must be in [0, 1]')
        if self.responsibility_min_std is not None:
            positive(self.responsibility_min_std, 'responsibility_min_std')
        if self.final_min_std is not None:
            positive(self.final_min_std, 'final_min_std')


CONSISTENCY_DISTANCES = ('pseudo_huber', 'l2')


@dataclass
class ConsistencyConfig:
    """Consistency distillation of the teacher into a one-step student (consistency.py)."""

    iterations: int = 3000
    batch_size: int = 256
    lr: float = 3e-4
    final_lr_fraction: float = 0.1
    # the teacher's Karras schedule over [sigma_min, sigma_max] cut into this many levels; the
    # teacher takes one Heun step between neighbours
    bins: int = 8
    distance: str = 'pseudo_huber'
    # the share of each batch taken on the teacher's sampling trajectories (from sigma_max *
    # eps); the rest is the forward process a + sigma eps of Song et al.
    trajectory_fraction: float = 0.5
    ema_decay: float = 0.95          # the target network: an EMA of the student's weights
    model_ema_decay: float = 0.999   # the weights saved: a slower EMA
    grad_clip: float = 1.0

    def validate(self) -> None:
        for name in ('iterations', 'batch_size'):
            at_least(getattr(self, name), 1, name)
        at_least(self.bins, 2, 'bins')
        positive(self.lr, 'lr')
        _check(0.0 <= self.final_lr_fraction <= 1.0, 'final_lr_fraction', 'must be in [0, 1]')
        one_of(self.distance, CONSISTENCY_DISTANCES, 'distance')
        _check(0.0 <= self.trajectory_fraction <= 1.0, 'trajectory_fraction',
               'must be in [0, 1]')
        for name in ('ema_decay', 'model_ema_decay'):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, f'must be in [0, 1), got {value}')
        positive(self.grad_clip, 'grad_clip')


VISION_ENCODERS = ('conv', 'resnet18')
MOE_ENCODERS = ('teacher', 'own')


@dataclass
class VisionConfig:
    """Camera observations (vision.py): each camera's image encoder and its augmentation. The
    teacher trains its encoders; the consistency student acts on the teacher's, frozen, and so
    does the VDD-MoE by default (`moe_encoder`); the likelihood baselines train their own."""

    encoder: str = 'conv'        # conv (shallow, spatial softmax) or resnet18 (GroupNorm)
    keypoints: int = 32          # spatial-softmax keypoints per camera
    feature_dim: int = 64        # features per camera and time step
    shift: int = 4               # random shift augmentation while training, in pixels
    moe_encoder: str = 'teacher'  # the VDD-MoE's: teacher (frozen copy) or own (trained by VDD)

    def validate(self) -> None:
        one_of(self.encoder, VISION_ENCODERS, 'encoder')
        one_of(self.moe_encoder, MOE_ENCODERS, 'moe_encoder')
        at_least(self.keypoints, 1, 'keypoints')
        at_least(self.feature_dim, 1, 'feature_dim')
        at_least(self.shift, 0, 'shift')


@dataclass
class TrainConfig:
    """Everything needed to train the teacher, distil it and train the baselines."""

    seed: int = 0
    obs_horizon: int = 2
    action_horizon: int = 8
    action_exec: int = 8
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    vdd: VDDConfig = field(default_factory=VDDConfig)
    gaussian_bc: BaselineConfig = field(default_factory=BaselineConfig)
    em_moe: BaselineConfig = field(default_factory=BaselineConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def validate(self) -> None:
        at_least(self.seed, 0, 'seed')
        at_least(self.obs_horizon, 1, 'obs_horizon')
        at_least(self.action_horizon, 1, 'action_horizon')
        at_least(self.action_exec, 1, 'action_exec')
        _check(self.action_exec <= self.action_horizon, 'action_exec',
               f'must be <= action_horizon ({self.action_horizon}), got {self.action_exec}')
        for name, floor in (('vdd.min_std', self.vdd.min_std),
                            ('vdd.init_em_final_min_std', self.vdd.init_em_final_min_std),
                            ('em_moe.final_min_std', self.em_moe.final_min_std),
                            ('gaussian_bc.final_min_std', self.gaussian_bc.final_min_std)):
            _check(floor is None or floor < self.moe.init_std, name,
                   f'must be below moe.init_std ({self.moe.init_std}), got {floor}')
        for name, floor in (('vdd.init_em_responsibility_min_std',
                             self.vdd.init_em_responsibility_min_std),
                            ('em_moe.responsibility_min_std', self.em_moe.responsibility_min_std)):
            _check(floor is None or floor > self.moe.min_std, name,
                   f'must exceed moe.min_std ({self.moe.min_std}) to have an effect, got {floor}')
        _check(self.gaussian_bc.responsibility_min_std is None,
               'gaussian_bc.responsibility_min_std', 'has no effect: Gaussian BC has one '
               'expert, whose responsibility is always 1; leave it unset')


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f'{name}: invalid value {value!r}')
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f'{name}: expected a mapping, got {type(value).__name__}')
        return _build(tp, value, f'{name}.')
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{name}: expected true or false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{name}: expected an integer, got {value!r}')
        _check(-INT_LIMIT <= value < INT_LIMIT, name, f'must lie in [-2**63, 2**63), got {value}')
        return value
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)   # YAML 1.1 reads 1e30 (no exponent sign) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{name}: expected a number, got {value!r}')
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        _check(math.isfinite(number), name, f'expected a finite number, got {value}')
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{name}: expected a string, got {value!r}')
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{name}: expected a list, got {value!r}')
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [v if item is Any else _coerce(v, item, f'{name}[{i}]')
                for i, v in enumerate(value)]
    return value


def key_text(key: Any) -> str:
    """A mapping key as it reads in a one-line message (repr when not plain printable text)."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key \
        else repr(key)


def _build(cls: type[C], data: Mapping[str, Any], prefix: str) -> C:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in known), key=repr)
    if unknown:
        raise ConfigError(f'{prefix}{key_text(unknown[0])}: unknown key (known: '
                          f'{", ".join(known)})')
    hints = typing.get_type_hints(cls)   # string annotations, resolved where cls is defined
    kwargs = {k: _coerce(v, hints[k], f'{prefix}{k}') for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, 'validate'):
        try:
            obj.validate()
        except ConfigError as exc:
            raise ConfigError(f'{prefix}{exc}') from None
    return obj


def from_dict(cls: type[C], data: Mapping[str, Any] | None, source: str = 'config') -> C:
    """Build and validate `cls` from a plain mapping; errors name `source` and the field."""
    try:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f'expected a mapping, got {type(data).__name__}')
        return _build(cls, data or {}, '')
    except ConfigError as exc:
        raise ConfigError(f'{source}: {exc}') from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (YAML-serialisable)."""
    return dataclasses.asdict(config)


def load_config(cls: type[C], path: str | os.PathLike,
                overrides: Mapping[str, Any] | None = None) -> C:
    """Read a YAML file into `cls`; `overrides` are dotted keys (`vdd.iterations: 10`)."""
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides or {})
    return from_dict(cls, data, str(path))


def safe_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`; bad YAML, recursive aliases and nesting too deep to read are a
    one-line ConfigError naming `where` and the position."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        problem = getattr(exc, 'problem', None) or str(exc).strip().splitlines()[0]
        at = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise ConfigError(f'{where}: not valid YAML ({problem}{at})') from None
    except RecursionError:
        raise ConfigError(f'{where}: YAML nested too deeply') from None
    _check_acyclic(data, where, set(), set())
    return data


def _check_acyclic(data: Any, where: str, parents: set[int], done: set[int]) -> None:
    """No container holds itself (YAML aliases can make one); shared ones are walked once."""
    if not isinstance(data, (dict, list)) or id(data) in done:
        return
    if id(data) in parents:
        raise ConfigError(f'{where}: a YAML alias refers to itself (recursive structure)')
    parents.add(id(data))
    for item in (data.values() if isinstance(data, dict) else data):
        _check_acyclic(item, where, parents, done)
    parents.discard(id(data))
    done.add(id(data))


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'{path}: config file not found')
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f'{path}: cannot read ({exc})') from None
    data = safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping at the top level')
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`['vdd.iterations=10', ...]` as dotted-key overrides (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition('=')
        if not sep or not key.strip():
            raise ConfigError(f'override {item!r}: expected KEY=VALUE (e.g. vdd.iterations=10)')
        out[key.strip()] = safe_yaml(value, f'override {item!r}: value')
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict in place (`{'vdd.iterations': 10}`)."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = str(dotted).split('.')
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f'{key_text(dotted)}: {key_text(key)} is not a section')
        node[leaf] = value
    return data
