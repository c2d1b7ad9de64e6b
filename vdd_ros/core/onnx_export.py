"""Export a checkpoint (VDD-MoE, the Gaussian BC / EM-MoE baselines, the teacher) to ONNX.

The graphs and their metadata are described in `vdd_ros.core.onnx_policy`, which runs them.
MoE: the acting graph of `MixtureOfExperts.predict` (the normalizers folded into the first
and last layers; the gating, the expert choice from the `expert` code and `u`, then only the
chosen expert's mean: its head on the shared backbone, or its own MLP with weights gathered
from the stacked `(Z, in, out)` ones). Teacher: one call of `DiffusionTeacher.denoise` on the
raw observation window (normalised in the graph), the action normalizer applied to a second
output. Mish runs as `NegatedMish`. The file is written atomically; torch and onnx are needed
here, never to run the file.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vdd_ros.core.checkpoint import load_model
from vdd_ros.core.io import atomic_path
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.onnx_policy import (ARGMAX, META_KEY, ONNX_FORMAT, SAMPLE, graph_io,
                                      make_session, read_metadata)
from vdd_ros.core.policy import PolicySpec, training_seed
from vdd_ros.core.teacher import DiffusionTeacher
from vdd_ros.errors import UserError

OPSET = 17          # LayerNormalization is one node from 17; onnxruntime >= 1.13 runs it
MIN_OPSET, MAX_OPSET = 17, 20


class NegatedMish(nn.Module):
    """Mish of `-z`: `z * tanh(log(sigmoid(z)))` (= mish(-z), as log sigmoid(-x) = -softplus(x)).

    onnxruntime runs Sigmoid, Log, Tanh and Mul vectorised but Softplus (and Mish) one value at
    a time, several times slower at these widths; the layer before computes `-x` instead of
    `x` (see `fast_mish`). Within a few 1e-6 of mish (the rounding of sigmoid near 1).
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.tanh(torch.log(torch.sigmoid(z)))


def fast_mish(seq: nn.Sequential) -> nn.Sequential:
    """A copy of `seq` in which each affine layer (Linear, LayerNorm) followed by Mish outputs
    its negation, read by a NegatedMish: the same function, faster in onnxruntime."""
    layers = [copy.deepcopy(m) for m in seq]
    for i in range(1, len(layers)):
        prev = layers[i - 1]
        if isinstance(layers[i], nn.Mish) and isinstance(prev, (nn.Linear, nn.LayerNorm)):
            with torch.no_grad():
                prev.weight.neg_()
                prev.bias.neg_()
            layers[i] = NegatedMish()
    return nn.Sequential(*layers)


class MoEActing(nn.Module):
    """`MixtureOfExperts.predict` as a graph: `(obs, u, expert) -> (action, expert_index,
    logits)`; see `vdd_ros.core.onnx_policy` for the codes of `expert`. Built from the folded
    layers of `MixtureOfExperts._acting_params`."""

    def __init__(self, moe: MixtureOfExperts) -> None:
        super().__init__()
        w1, b1, experts = moe._acting_params()
        with torch.no_grad():
            folded = nn.Linear(w1.shape[1], w1.shape[0])
            folded.weight.copy_(w1)
            folded.bias.copy_(b1)
        # the network before the choice: the backbone ('shared', the gating after it) or the
        # gating encoder ('independent')
        self.first = fast_mish(nn.Sequential(folded, *moe._trunk))
        self.gate = None if moe.independent else fast_mish(moe.gate)
        # the chosen expert's layers, (Z, in, out) each; a hidden layer outputs its negation
        # for the NegatedMish after it (as fast_mish does)
        self.layers = len(experts)
        for k, (w, b) in enumerate(experts):
            sign = -1.0 if k < self.layers - 1 else 1.0
            self.register_buffer(f'w{k}', sign * w.transpose(1, 2).contiguous())
            self.register_buffer(f'b{k}', sign * b)
        self.mish = NegatedMish()
        self.action_shape = (moe.action_horizon, moe.action_dim)

    def forward(self, obs: torch.Tensor, u: torch.Tensor,
                expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = obs.flatten(1)
        h = self.first(x)
        if self.gate is None:
            logits, h = h, x
        else:
            logits = self.gate(h)
        # inverse CDF of the gating at u (as MixtureOfExperts draws), the last expert
        # taking what rounding leaves above the last boundary
        cdf = torch.softmax(logits, -1).cumsum(-1)
        drawn = (cdf[:, :-1] <= u[:, None] * cdf[:, -1:]).sum(-1)
        auto = torch.where(expert == ARGMAX, logits.argmax(-1), drawn)
        index = torch.where(expert < 0, auto, expert)
        for k in range(self.layers):
            w, b = getattr(self, f'w{k}'), getattr(self, f'b{k}')
            h = torch.matmul(h[:, None], w[index])[:, 0] + b[index]
            h = self.mish(h) if k < self.layers - 1 else h
        return h.reshape(-1, *self.action_shape), index, logits


class TeacherStep(nn.Module):
    """One `DiffusionTeacher.denoise` call on the raw observation window:
    `(x, obs, sigma) -> (denoised, action)`. The observation is normalised as torch does it
    (folding it into the input layer cost up to 1e-5 over a sampler's steps)."""

    def __init__(self, teacher: DiffusionTeacher) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(teacher)
        net = self.teacher.net
        net.blocks = nn.ModuleList(fast_mish(block) for block in net.blocks)
        net.out = fast_mish(net.out)
        for name, norm, repeat in (('obs', teacher.obs_normalizer, teacher.obs_horizon),
                                   ('action', teacher.action_normalizer,
                                    teacher.action_horizon)):
            self.register_buffer(f'{name}_offset', norm.offset.repeat(repeat).clone())
            self.register_buffer(f'{name}_scale', norm.scale.repeat(repeat).clone())
        self.action_shape = (teacher.action_horizon, teacher.action_dim)

    def forward(self, x: torch.Tensor, obs: torch.Tensor,
                sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obs = (obs.flatten(1) - self.obs_offset) / self.obs_scale
        denoised = self.teacher.denoise(x, obs, sigma)
        action = denoised * self.action_scale + self.action_offset
        return denoised, action.reshape(-1, *self.action_shape)


def metadata(model: nn.Module, spec: PolicySpec, meta: dict[str, Any], opset: int,
             binding: dict[str, Any] | None = None, source: str = '') -> dict[str, Any]:
    """The `vdd_ros` metadata of an exported model (see `vdd_ros.core.onnx_policy`)."""
    out: dict[str, Any] = {
        'format': ONNX_FORMAT, 'kind': model.kind, 'method': meta.get('method', model.kind),
        'spec': spec.to_dict(), 'binding': binding, 'opset': int(opset),
        'source': {'checkpoint': source, 'torch': torch.__version__},
        'train': {'seed': training_seed(meta, source or 'the checkpoint')},
    }
    if model.kind == 'moe':
        out['moe'] = {'num_experts': model.num_experts, 'expert_mode': model.expert_mode,
                      'experts': model.cfg.experts,
                      'expert_codes': {'sample': SAMPLE, 'argmax': ARGMAX, 'pinned': '>= 0'}}
    else:
        cfg = model.cfg
        out['teacher'] = {'sampling_steps': int(model.sampling_steps), 'sampler': cfg.sampler,
                          'sigma_min': cfg.sigma_min, 'sigma_max': cfg.sigma_max,
                          'rho': cfg.rho, 'sigma_data': cfg.sigma_data}
    inputs, outputs = graph_io(out)
    out['inputs'] = {k: {'type': t, 'shape': s} for k, (t, s) in inputs.items()}
    out['outputs'] = {k: {'type': t, 'shape': s} for k, (t, s) in outputs.items()}
    return out


def export_model(model: nn.Module, spec: PolicySpec, meta: dict[str, Any] | None = None,
                 opset: int = OPSET, binding: dict[str, Any] | None = None,
                 source: str = '') -> bytes:
    """The serialized ONNX model (with its metadata) of a MixtureOfExperts or teacher."""
    import onnx
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise UserError(f'--opset: must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}')
    model = model.cpu().eval()
    horizon, dim = spec.obs_horizon, spec.obs_dim
    obs = torch.zeros(1, horizon, dim)
    if model.kind == 'moe':
        module: nn.Module = MoEActing(model)
        args: tuple = (obs, torch.full((1,), 0.5), torch.full((1,), SAMPLE, dtype=torch.long))
        names = (['obs', 'u', 'expert'], ['action', 'expert_index', 'logits'])
    else:
        module = TeacherStep(model)
        args = (torch.zeros(1, model.flat_act), obs, torch.ones(1))
        names = (['x', 'obs', 'sigma'], ['denoised', 'action'])
    axes = {n: {0: 'batch'} for n in names[0] + names[1]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')   # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=int(opset),
                          input_names=names[0], output_names=names[1], dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    info = metadata(model, spec, meta or {}, opset, binding, source)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    proto.producer_name, proto.doc_string = 'vdd_ros', f'vdd_ros {info["method"]} policy'
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                      opset: int = OPSET, expert_mode: str | int | None = None,
                      steps: int | None = None, binding: Any = None) -> dict[str, Any]:
    """Export a checkpoint folder to `out` (.onnx, written atomically); returns the metadata.

    `expert_mode` (mixtures) and `steps` (teacher) set the file's defaults; `binding` (a
    vdd_ros.binding.Binding) must match the checkpoint's observation and action layout and is
    recorded in the metadata.
    """
    out = Path(out)
    if out.suffix != '.onnx':
        raise UserError(f'--out: must name a .onnx file, got {out}')
    model, spec, meta = load_model(checkpoint)
    if model.kind not in ('moe', 'teacher'):
        raise UserError(f'{checkpoint}: a {model.kind} checkpoint; ONNX export covers MoE and '
                        f'teacher checkpoints')
    if model.encoder.has_cameras:
        cameras = ', '.join(k for k, _ in model.encoder.cameras)
        raise UserError(f'{checkpoint}: a camera policy ({cameras}); ONNX export covers '
                        'state policies only')
    if expert_mode is not None:
        if model.kind != 'moe':
            raise UserError(f'{checkpoint}: --expert-mode applies to MoE checkpoints, this is a '
                            f'{model.kind}')
        model.set_expert_mode(expert_mode)
    if steps is not None:
        if model.kind != 'teacher':
            raise UserError(f'{checkpoint}: --steps applies to teacher checkpoints, this is a '
                            f'{model.kind}')
        if int(steps) < 1:
            raise UserError(f'--steps: must be >= 1, got {steps}')
        model.sampling_steps = int(steps)
    bound = None
    if binding is not None:
        fields = [(str(k), int(n)) for k, n in spec.obs_fields]
        if binding.obs_fields != fields or binding.action_dim != spec.action_dim:
            raise UserError(f'--binding: {binding.name or "the binding"} has observation '
                            f'{_fields(binding.obs_fields)} and {binding.action_dim} action '
                            f'values, {checkpoint} has {_fields(fields)} and '
                            f'{spec.action_dim}')
        bound = binding.to_dict()
    data = export_model(model, spec, meta, opset, bound, str(checkpoint))
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        return read_metadata(make_session(str(tmp), 1, str(out)), str(out))


def _fields(fields: list[tuple[str, int]]) -> str:
    return ', '.join(f'{k}[{n}]' for k, n in fields)


def max_difference(model: nn.Module, policy_model: Any, spec: PolicySpec, count: int = 1000,
                   seed: int = 0) -> tuple[float, float]:
    """(largest |torch - onnx| action value, largest |torch| action value) over `count`
    observation windows drawn around the model's normalizer (offset + scale * N(0, 1)) with
    the same random numbers (MoE: the uniform of seed i; teacher: the initial noise)."""
    from vdd_ros.core.onnx_policy import TorchRandom
    rng = np.random.default_rng(seed)
    off = model.obs_normalizer.offset.numpy()
    scale = model.obs_normalizer.scale.numpy()
    windows = (off + scale * rng.standard_normal((count, spec.obs_horizon, spec.obs_dim))
               ).astype(np.float32)
    worst = biggest = 0.0
    for i, window in enumerate(windows):
        gen = torch.Generator().manual_seed(seed + i)
        if model.kind == 'moe':
            model.reset()
        with torch.inference_mode():
            want = model.predict(torch.from_numpy(window)[None], generator=gen)[0][0].numpy()
        if model.kind == 'moe':
            policy_model.reset()
            got = policy_model.predict(window, TorchRandom(seed + i))[0]
        else:
            noise = torch.randn(1, model.flat_act, generator=torch.Generator().manual_seed(
                seed + i))[0].numpy()
            got = policy_model.sample(window, noise)
        worst = max(worst, float(np.abs(got - want).max()))
        biggest = max(biggest, float(np.abs(want).max()))
    return worst, biggest
