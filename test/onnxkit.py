"""Test helpers: tiny checkpoints of every policy kind (random weights far from their
initialisation, non-trivial normalizers, an observation window and an action chunk) and their
ONNX exports."""
from __future__ import annotations

from pathlib import Path

import torch

from vdd_ros.core.checkpoint import save_checkpoint
from vdd_ros.core.config import MoEConfig, TeacherConfig
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.onnx_export import export_checkpoint
from vdd_ros.core.policy import PolicySpec
from vdd_ros.core.teacher import DiffusionTeacher

OBS_FIELDS = [('eef', 3), ('cube', 4)]
SPEC = PolicySpec(obs_fields=OBS_FIELDS, action_dim=2, obs_horizon=2, action_horizon=3,
                  action_exec=2)
# method -> model; the baselines are mixtures too (Gaussian BC has one expert); independent
# experts but for shared_moe (a shared backbone)
KINDS = {
    'vdd_moe': lambda: MixtureOfExperts(MoEConfig(num_experts=4, hidden_dim=16, num_layers=2,
                                                  gating_hidden_dim=8), 7, 2, 2, 3),
    'shared_moe': lambda: MixtureOfExperts(MoEConfig(num_experts=4, hidden_dim=16,
                                                     num_layers=2, gating_hidden_dim=8,
                                                     experts='shared'), 7, 2, 2, 3),
    'gaussian_bc': lambda: MixtureOfExperts(MoEConfig(num_experts=1, hidden_dim=16,
                                                      num_layers=2, gating_hidden_dim=8),
                                            7, 2, 2, 3),
    'em_moe': lambda: MixtureOfExperts(MoEConfig(num_experts=3, hidden_dim=16, num_layers=1,
                                                 gating_hidden_dim=8, covariance='full',
                                                 expert_mode='argmax'), 7, 2, 2, 3),
    'teacher': lambda: DiffusionTeacher(TeacherConfig(hidden_dim=16, num_layers=2,
                                                      sampling_steps=4), 7, 2, 2, 3),
    'teacher_heun': lambda: DiffusionTeacher(TeacherConfig(hidden_dim=16, num_layers=3,
                                                           sampling_steps=3, sampler='heun'),
                                             7, 2, 2, 3),
}


def tiny_checkpoint(path: Path, method: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = KINDS[method]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for norm in (model.obs_normalizer, model.action_normalizer):
            norm.offset.uniform_(-1, 1)
            norm.scale.uniform_(0.5, 2.0)
    return save_checkpoint(path, model, SPEC, method)


def tiny_exports(folder: Path) -> dict[str, tuple[Path, Path]]:
    """method -> (checkpoint folder, exported .onnx file) for every kind."""
    out = {}
    for method in KINDS:
        ckpt = tiny_checkpoint(folder / method, method)
        export_checkpoint(ckpt, folder / f'{method}.onnx')
        out[method] = (ckpt, folder / f'{method}.onnx')
    return out
