"""Every training loop on tiny synthetic data, in one process or as one rank under torchrun.

`python ddpkit.py OUT [DEVICE]` (started by torchrun) trains on every rank and writes what the
tests compare to OUT/rank<R>.safetensors: parameters, loss curves and the rank's rows of a
batch. Tests call `train_all` in-process for the run without a process group, and `torchrun`.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vdd_ros.core.baselines import train_em
from vdd_ros.core.config import BaselineConfig, MoEConfig, TeacherConfig, VDDConfig
from vdd_ros.core.distributed import DataParallel, data_parallel
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.scores import TeacherScore
from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
from vdd_ros.core.vdd import distill
from vdd_ros.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# 2 ranks against 1 differ by floating-point summation order only: at most 1.2e-7 relative to
# 1 + max|x| was measured over these runs (and 1.2e-7 after 100 teacher iterations of the CLI),
# while another seed differs by 6e-3 or more
TOLERANCE = 1e-5
# odd global batches, so that two ranks get shares of unequal size
TEACHER_BATCH, EM_BATCH, VDD_BATCH = 33, 41, 25


def _moe(experts: int, covariance: str = 'diag') -> MixtureOfExperts:
    return MixtureOfExperts(MoEConfig(num_experts=experts, hidden_dim=24, num_layers=1,
                                      gating_hidden_dim=8, covariance=covariance), 3, 2)


def train_all(dp: DataParallel | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Teacher, EM warm start then VDD (full covariance), and Gaussian BC; their parameters
    and loss curves by name (on the device of `dp`, else the CPU)."""
    device = dp.device if dp is not None else torch.device('cpu')
    gen = torch.Generator().manual_seed(0)
    obs, actions = torch.randn(160, 3, generator=gen), torch.rand(160, 2, generator=gen) * 2 - 1
    torch.manual_seed(0)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=24, num_layers=2,
                                             batch_size=TEACHER_BATCH), 3, 2)
    moe, bc = _moe(3, 'full'), _moe(1)
    moe.init_means(actions, gen)
    obs, actions = obs.to(device), actions.to(device)
    for model in (teacher, moe, bc):
        model.to(device)
    curves = {
        'teacher': train_teacher(teacher, obs, actions, iterations=20, seed=seed,
                                 show_bar=False, dp=dp),
        'warm': train_em(moe, obs, actions, BaselineConfig(iterations=10, batch_size=EM_BATCH),
                         seed=seed, stage='warm', show_bar=False, dp=dp),
        'vdd': distill(moe, TeacherScore(teacher), obs, actions,
                       VDDConfig(iterations=8, batch_size=VDD_BATCH, uniform_gating_fraction=0.25),
                       seed=seed, show_bar=False, dp=dp),
        'bc': train_em(bc, obs, actions, BaselineConfig(iterations=10, batch_size=EM_BATCH),
                       seed=seed, stage='gaussian_bc', show_bar=False, dp=dp),
    }
    out = {f'curve.{name}': torch.tensor([v for _, v in c], dtype=torch.float64)
           for name, c in curves.items()}
    for prefix, model in (('teacher', teacher), ('vdd', moe), ('bc', bc)):
        out.update({f'{prefix}.{k}': v.detach().cpu().clone()
                    for k, v in model.state_dict().items()})
    return out


def torchrun_env() -> dict[str, str]:
    """The environment for a torchrun child: this source tree first, one thread per rank,
    gloo on the loopback interface, no launcher variables of an enclosing run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                        'MASTER_PORT')}
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    env.update(OMP_NUM_THREADS='1', GLOO_SOCKET_IFNAME='lo')
    return env


def torchrun(nproc: int, *args: str, timeout: float = 300,
             cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc ARGS` on 127.0.0.1, output captured."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--local-addr',
           '127.0.0.1', '--nproc-per-node', str(nproc), *args]
    return subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def close_to(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to 1 + max |b|."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / (1 + b.abs().max())) if b.numel() else 0.0


def main(folder: str, device: str = 'cpu') -> None:
    torch.set_num_threads(1)
    with data_parallel(device) as dp:
        out = train_all(dp)
        rows = dp.rows(TEACHER_BATCH)
        out['rows'] = torch.arange(TEACHER_BATCH)[rows]
        out['world'] = torch.tensor(dp.world)
        out['backend_is_nccl'] = torch.tensor(torch.distributed.get_backend() == 'nccl')
        dp.check_same('c0ffee', 'the same data')
        try:
            dp.check_same(f'{dp.rank:x}', 'the data')
            out['mismatch_caught'] = torch.tensor(False)
        except UserError as exc:
            out['mismatch_caught'] = torch.tensor('the data differs between ranks' in str(exc))
        save_file(out, os.path.join(folder, f'rank{dp.rank}.safetensors'))


if __name__ == '__main__':
    main(*sys.argv[1:])
