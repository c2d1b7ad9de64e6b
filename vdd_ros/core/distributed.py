"""Data-parallel training over torch.distributed, one rank per process (launched by torchrun).

Every rank holds the whole dataset and draws the same *global* batch (indices and noise) from a
generator seeded alike on all ranks; a rank evaluates the loss on its contiguous share of the
rows only (`rows`), and one all-reduce per optimiser step (`sync`) sums the share-weighted
gradients together with the logged values and a stop vote. Every rank then steps with the
gradient of the global batch mean, so the parameters stay identical across ranks, the result
does not depend on the number of ranks beyond floating-point summation order, and a run resumed
with another number of ranks continues the same random stream.

Without torchrun (no WORLD_SIZE in the environment) there is no process group and
`DataParallel` passes everything through unchanged. The backend follows the device: gloo on
CPU, NCCL on CUDA (each rank on `cuda:LOCAL_RANK`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vdd_ros.errors import UserError

ENV_KEYS = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (a pass-through without a process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    active: bool = False         # a process group is in use (collectives run, even at world 1)
    stop_vote: bool = False      # the agreed stop flag of the last `sync`

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and progress."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's contiguous share of a global batch of `batch` rows."""
        return slice(batch * self.rank // self.world, batch * (self.rank + 1) // self.world)

    def share(self, batch: int) -> float:
        """The fraction of the global batch this rank evaluates."""
        rows = self.rows(batch)
        return (rows.stop - rows.start) / batch

    def check_batch(self, batch: int, stage: str) -> None:
        """Every rank needs at least one row of each global batch."""
        if batch < self.world:
            raise UserError(f'{stage}: a batch of {batch} rows cannot be shared by '
                            f'{self.world} ranks (batch_size, or the dataset, is too small)')

    def check_same(self, digest: str, what: str,
                   hint: str = 'every rank must read the same data') -> None:
        """Raise UserError on every rank unless all ranks hold the same hex `digest` of `what`
        (e.g. the training data, which every node must read alike)."""
        if not (self.active and self.world > 1):
            return
        value = torch.tensor([int(digest[:15], 16)] * 2, dtype=torch.int64, device=self.device)
        value[1].neg_()
        dist.all_reduce(value, dist.ReduceOp.MAX)
        if int(value[0]) != -int(value[1]):
            raise UserError(f'{what} differs between ranks (this is rank {self.rank}, digest '
                            f'{digest}): {hint}')

    def broadcast_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (as DDP does at wrap time)."""
        if self.active and self.world > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0)

    def sync(self, params: Iterable[nn.Parameter], share: float,
             values: Iterable[torch.Tensor | float], stop: bool = False) -> list[float]:
        """All-reduce the gradients of `params` and the scalar `values`, both weighted by this
        rank's `share` of the batch, in one collective; returns the global values as floats.

        The ranks' `stop` flags are OR-ed into `stop_vote`. Without a process group, or with one
        of one rank (where the all-reduce would be the identity, and its thread hand-off alone
        cost 1-4 ms a step on a loaded 2-core machine), this only turns `values` into floats.
        Parameters without a gradient are left out: every rank runs the same code, so they are
        the same on every rank.
        """
        values = list(values)
        if not self.active or self.world == 1:    # nothing to reduce
            self.stop_vote = bool(stop)
            return [v.item() if isinstance(v, torch.Tensor) else float(v) for v in values]
        params = [p for p in params if p.grad is not None]
        ref = params[0].grad if params else torch.empty(0, device=self.device)
        tail = torch.tensor([*(float(v) if not isinstance(v, torch.Tensor) else 0.0
                               for v in values), 0.0], dtype=ref.dtype, device=ref.device)
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                tail[i] = v.detach()
        buf = torch.cat([*(p.grad.reshape(-1) for p in params), tail])
        if share != 1.0:
            buf.mul_(share)
        buf[-1] = float(bool(stop))
        dist.all_reduce(buf)
        *grads, reduced = buf.split([*(p.numel() for p in params), len(tail)])
        for p, grad in zip(params, grads):   # views of the reduced buffer, no copy back
            p.grad = grad.view_as(p)
        reduced = reduced.tolist()
        self.stop_vote = reduced[-1] > 0
        return reduced[:-1]

    def should_stop(self, local: bool) -> bool:
        """Whether to end the loop: the agreed vote of the last `sync` in a process group, else
        the local flag."""
        return self.stop_vote if self.active else local

    def barrier(self) -> None:
        if self.active and self.world > 1:
            if self.device.type == 'cuda':
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return 'WORLD_SIZE' in os.environ


def rank_from_env() -> int:
    """This process's global rank under torchrun, 0 otherwise (before any process group)."""
    try:
        return int(os.environ.get('RANK', '0'))
    except ValueError:
        return 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise UserError(f'environment {name}={raw!r}: expected an integer (set by '
                        f'torchrun)') from None


def resolve_device(device: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """The torch device of one rank: 'cuda' becomes `cuda:LOCAL_RANK`; errors name CUDA."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f'device {device!r}: not a torch device (e.g. cpu, cuda, '
                        f'cuda:1)') from None
    if dev.type != 'cuda':
        return dev
    if not torch.cuda.is_available():
        raise UserError(f'device {device}: CUDA is not available')
    if dev.index is None:
        dev = torch.device('cuda', local_rank % torch.cuda.device_count())
    elif local_world > 1:
        raise UserError(f'device {device}: with {local_world} ranks on this machine pass '
                        f'--device cuda (each rank then takes cuda:LOCAL_RANK)')
    return dev


@contextlib.contextmanager
def data_parallel(device: str = 'cpu') -> Iterator[DataParallel]:
    """This process's DataParallel for a training job.

    Under torchrun it joins (or creates) the default process group, gloo on CPU and NCCL on
    CUDA, and destroys a group it created when the job ends, after a barrier so that every rank
    returns once rank 0 has written the checkpoint. Otherwise no process group is made.
    """
    if not launched():
        yield DataParallel(device=resolve_device(device))
        return
    world, rank = _env_int('WORLD_SIZE', 1), _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0)
    dev = resolve_device(device, local_rank, _env_int('LOCAL_WORLD_SIZE', world))
    created = not dist.is_initialized()
    if created:
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
            dist.init_process_group('nccl', device_id=dev)
        else:
            dist.init_process_group('gloo')
    dp = DataParallel(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                      device=dev, active=True)
    if (dp.rank, dp.world) != (rank, world):
        raise UserError(f'process group rank {dp.rank} of {dp.world} differs from the '
                        f'environment (RANK={rank}, WORLD_SIZE={world})')
    try:
        yield dp
        dp.barrier()
    finally:
        if created:
            dist.destroy_process_group()
