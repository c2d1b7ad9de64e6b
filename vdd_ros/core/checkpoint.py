"""One self-describing checkpoint folder, and the one loader for every policy.

    <folder>/config.yaml           format, model kind, training method, model config, spec,
                                   training summary (iterations, final loss)
    <folder>/model.safetensors     network weights
    <folder>/normalizer.safetensors observation and action normalizers
    <folder>/curves.json           training curves, at most CURVE_POINTS points each

Loading never unpickles code: the model is rebuilt from the YAML and filled from safetensors.
`load_policy` also takes an exported `.onnx` file (`vdd-ros export`), which it runs through
onnxruntime without importing torch (torch is imported only for checkpoint folders).
Training curves stay out of config.yaml so that it loads fast whatever the run's length
(checkpoints that kept `metrics.loss_history` in config.yaml still load). Folders are written
atomically (a temporary sibling, then a rename), every file with the normal umask.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vdd_ros.core.config import MoEConfig, TeacherConfig, VisionConfig, from_dict, safe_yaml
from vdd_ros.core.policy import ChunkPolicy, ModelPolicy, PolicySpec, training_seed
from vdd_ros.errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, NORMALIZER_FILE = 'config.yaml', 'model.safetensors', \
    'normalizer.safetensors'
CURVES_FILE = 'curves.json'
CURVE_POINTS = 2000   # a stored curve keeps at most this many (bin-averaged) points
# model kind -> (module, class, config dataclass)
MODEL_KINDS: dict[str, tuple[str, str, type]] = {
    'teacher': ('vdd_ros.core.teacher', 'DiffusionTeacher', TeacherConfig),
    'moe': ('vdd_ros.core.moe', 'MixtureOfExperts', MoEConfig),
    # the one-step consistency-distilled student: the teacher's network and config
    'consistency': ('vdd_ros.core.consistency', 'ConsistencyStudent', TeacherConfig),
}
_NORMALIZER_PREFIXES = ('obs_normalizer.', 'action_normalizer.')


def atomic_dir(path: Path) -> Path:
    """A fresh temporary sibling of `path` to fill and then `replace_dir` into place."""
    tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    old = path.parent / f'.{path.name}.old-{os.getpid()}'
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def downsample(curve: list[Any], points: int = CURVE_POINTS) -> list[list[float]]:
    """`[[iteration, value], ...]` as at most `points` bins: the mean value of each bin at
    the bin's last iteration."""
    if len(curve) <= points:
        return [[int(i), float(v)] for i, v in curve]
    size = len(curve) / points
    out = []
    for b in range(points):
        chunk = curve[int(b * size):int((b + 1) * size)]
        out.append([int(chunk[-1][0]), float(sum(float(v) for _, v in chunk) / len(chunk))])
    return out


def tail_mean(curve: list[Any], fraction: float = 0.05) -> float:
    """Mean value over the last `fraction` of a curve (NaN when it is empty)."""
    if not curve:
        return math.nan
    tail = curve[-max(1, int(len(curve) * fraction)):]
    return float(sum(float(v) for _, v in tail) / len(tail))


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, spec: PolicySpec,
                    method: str, train_config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None,
                    curves: dict[str, list[Any]] | None = None) -> Path:
    """Write `model` (a DiffusionTeacher or MixtureOfExperts) as a checkpoint folder.

    `metrics` are small values kept in config.yaml; `curves` (name -> `[[iteration, value],
    ...]`) go to curves.json, each downsampled to at most CURVE_POINTS points.
    """
    from safetensors.torch import save as safetensors_bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(path)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        weights = {k: v for k, v in state.items() if not k.startswith(_NORMALIZER_PREFIXES)}
        norms = {k: v for k, v in state.items() if k.startswith(_NORMALIZER_PREFIXES)}
        (tmp / WEIGHTS_FILE).write_bytes(safetensors_bytes(weights))
        (tmp / NORMALIZER_FILE).write_bytes(safetensors_bytes(norms))
        if curves:
            (tmp / CURVES_FILE).write_text(json.dumps(
                {name: downsample(curve) for name, curve in curves.items()}) + '\n')
        meta = {
            'format': FORMAT_VERSION,
            'kind': model.kind,
            'method': method,
            'model': dataclasses.asdict(model.cfg),
            'spec': spec.to_dict(),
            **({'vision': dataclasses.asdict(model.encoder.cfg)}
               if model.encoder.has_cameras else {}),
            'train': train_config or {},
            'metrics': metrics or {},
        }
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.yaml of a checkpoint folder; errors name the file."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f'{path}: checkpoint folder not found')
    if not cfg_file.is_file():
        raise UserError(f'{cfg_file}: missing (not a vdd_ros checkpoint folder)')
    try:
        text = cfg_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'{cfg_file}: cannot read ({exc})') from None
    meta = safe_yaml(text, str(cfg_file))
    if not isinstance(meta, dict) or meta.get('format') != FORMAT_VERSION:
        raise UserError(f'{cfg_file}: unsupported checkpoint format '
                        f'{meta.get("format") if isinstance(meta, dict) else meta!r}')
    if meta.get('kind') not in MODEL_KINDS:
        raise UserError(f'{cfg_file}: kind: unknown model kind {meta.get("kind")!r} '
                        f'(known: {", ".join(MODEL_KINDS)})')
    return meta


def read_training(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's training summary: `iterations`, `final_loss` and `loss_history`
    (downsampled; empty when none was recorded), from curves.json and config.yaml, or from
    config.yaml alone for checkpoints that kept the whole history there."""
    path = Path(path)
    metrics = read_meta(path).get('metrics') or {}
    if not isinstance(metrics, dict):
        metrics = {}
    legacy = metrics.get('loss_history') or []
    history = legacy
    curves_file = path / CURVES_FILE
    if curves_file.is_file():
        try:
            curves = json.loads(curves_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f'{curves_file}: not readable JSON ({exc})') from None
        history = (curves if isinstance(curves, dict) else {}).get('loss_history') or []
    try:
        history = [[int(i), float(v)] for i, v in history]
        iterations = int(metrics.get('iterations', len(legacy) or len(history)))
        final = float(metrics.get('final_loss', tail_mean(legacy or history)))
    except (TypeError, ValueError):
        raise UserError(f'{path}: training metrics: expected an iteration count, a final '
                        f'loss and [iteration, loss] pairs') from None
    return {'iterations': iterations, 'final_loss': final, 'loss_history': downsample(history)}


def load_model(path: str | os.PathLike,
               device: str = 'cpu') -> tuple[torch.nn.Module, PolicySpec, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder: (model in eval mode, spec, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    meta = read_meta(path)
    module, cls_name, cfg_cls = MODEL_KINDS[meta['kind']]
    model_cfg = meta.get('model')
    if meta['kind'] == 'moe' and isinstance(model_cfg, dict) and 'experts' not in model_cfg:
        model_cfg = {**model_cfg, 'experts': 'shared'}   # written before independent experts
    cfg = from_dict(cfg_cls, model_cfg, f'{path / CONFIG_FILE} (model)')
    try:
        spec = PolicySpec.from_dict(meta['spec'])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f'{path / CONFIG_FILE}: spec: invalid ({exc})') from None
    vision = meta.get('vision')
    if vision is not None:
        vision = from_dict(VisionConfig, vision, f'{path / CONFIG_FILE} (vision)')
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        model = cls(cfg, spec.obs_dim, spec.action_dim, spec.obs_horizon, spec.action_horizon,
                    fields=spec.obs_fields, vision=vision)
    except ValueError as exc:
        raise UserError(f'{path / CONFIG_FILE}: spec: {exc}') from None
    state: dict[str, torch.Tensor] = {}
    for name in (WEIGHTS_FILE, NORMALIZER_FILE):
        try:
            state.update(load_file(str(path / name)))
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise UserError(f'{path / name}: cannot read weights ({exc})') from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f'{path / WEIGHTS_FILE}: weights do not match the config ({first})') \
            from None
    return model.to(device).eval(), spec, meta


def load_policy(path: str | os.PathLike, device: str = 'cpu', expert_mode: str | int | None = None,
                steps: int | None = None, threads: int | None = None) -> ChunkPolicy:
    """Any checkpoint (teacher, VDD-MoE, baseline) or exported `.onnx` file as a Policy.

    `expert_mode` applies to mixtures, `steps` (sampling steps, network calls per chunk) to
    the teacher and the consistency student (multistep consistency sampling); `threads`
    (onnxruntime intra-op threads, default 1) to `.onnx` files, which run on the CPU.
    """
    if str(path).endswith('.onnx'):
        if device != 'cpu':
            raise UserError(f'{path}: an exported .onnx policy runs on the CPU, not {device!r}')
        from vdd_ros.core.onnx_policy import load_onnx_policy
        return load_onnx_policy(path, expert_mode=expert_mode, steps=steps,
                                threads=1 if threads is None else threads)
    model, spec, meta = load_model(path, device)
    if expert_mode is not None:
        if not hasattr(model, 'set_expert_mode'):
            raise UserError(f'{path}: expert_mode applies to MoE checkpoints, this is a '
                            f'{meta["kind"]}')
        model.set_expert_mode(expert_mode)
    if steps is not None:
        if not hasattr(model, 'sampling_steps'):
            raise UserError(f'{path}: steps applies to teacher and consistency checkpoints, '
                            f'this is a {meta["kind"]}')
        if int(steps) < 1:
            raise UserError(f'steps: must be >= 1, got {steps}')
        model.sampling_steps = int(steps)
    policy = ModelPolicy(model, spec, device, training_seed(meta, str(Path(path) / CONFIG_FILE)))
    policy.meta = meta
    return policy
