"""`vdd-ros pipeline` settings: config/pipeline.yaml, merged per task, validated."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from vdd_ros.core.config import (TrainConfig, apply_overrides, at_least, check_expert_mode,
                                 from_dict, key_text, positive, read_yaml_mapping, to_dict)
from vdd_ros.core.io import package_config
from vdd_ros.errors import ConfigError, UserError


@dataclass
class PipelineConfig:
    """Settings of one pipeline run on one task (config/pipeline.yaml, merged per task)."""

    demos: int = 200                     # successful scripted demonstrations to collect
    seeds: int = 1                       # training seeds: train.seed, train.seed + 1, ...
    collect_workers: int = 2
    collect_seed: int = 0                # first collection seed
    eval_episodes: int = 50              # rollouts per policy, on the same evaluation seeds
    eval_workers: int = 2                # in-process evaluations (the ROS one runs one sim)
    ros_control_rate_hz: float = 500.0   # policy_node timer in the lockstep ROS evaluation
    teacher_steps: int | None = None     # teacher's default sampling steps (None: checkpoint's)
    expert_mode: str | int | None = None  # VDD-MoE expert choice (None: checkpoint's)
    video_episodes_per_mode: int = 1     # VDD-MoE episodes rendered per behaviour mode
    latency_queries: int = 1000          # timed single-observation queries per policy
    horizon: int | None = None           # --dataset runs: steps per episode (None: longest demo)
    policies: list[str] | None = None    # the policy kinds trained (None: every registered one)
    train: dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig overrides

    def validate(self) -> None:
        for name in ('demos', 'seeds', 'collect_workers', 'eval_episodes', 'eval_workers',
                     'video_episodes_per_mode'):
            at_least(getattr(self, name), 1, name)
        at_least(self.collect_seed, 0, 'collect_seed')
        at_least(self.latency_queries, 10, 'latency_queries')
        if self.horizon is not None:
            at_least(self.horizon, 1, 'horizon')
        positive(self.ros_control_rate_hz, 'ros_control_rate_hz')
        if self.teacher_steps is not None:
            at_least(self.teacher_steps, 1, 'teacher_steps')
        if self.policies is not None:
            from vdd_ros.policies import POLICY_KINDS, STUDENT, TEACHER
            for i, name in enumerate(self.policies):
                if name not in POLICY_KINDS:
                    raise ConfigError(f'policies[{i}]: unknown policy kind {name!r} (known: '
                                      f'{", ".join(POLICY_KINDS)})')
            missing = [n for n in (TEACHER, STUDENT) if n not in self.policies]
            if missing or len(set(self.policies)) != len(self.policies):
                raise ConfigError(f'policies: must list {TEACHER} and {STUDENT}, each kind '
                                  f'once, got {self.policies}')
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

    def kinds(self) -> list[str]:
        """The policy kinds this run trains, in registry order."""
        from vdd_ros.policies import POLICY_KINDS
        return [k for k in POLICY_KINDS if self.policies is None or k in self.policies]

    def training_seeds(self) -> list[int]:
        """The training seeds: `seeds` consecutive ones from `train.seed`."""
        first = self.train_config().seed
        return list(range(first, first + self.seeds))


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


def describe_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (for the console and the report)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()
