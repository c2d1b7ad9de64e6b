"""Resumable training: a training loop's whole state in safetensors plus a small JSON file.

    <out>.state/gen-NNNNNN/state.safetensors  every tensor: model (and EMA) weights, optimizer
                                              moments and steps, RNG states (uint8), the loss
                                              curve so far
    <out>.state/gen-NNNNNN/state.json         format, stage, iteration, world size, the run's
                                              identity (config, data fingerprint) and the
                                              non-tensor parts of the optimizer and scheduler
                                              state dicts, tensors named by key

Nothing is unpickled: state dicts are split into JSON values and named tensors and rebuilt
from both. Each save is a new generation folder renamed into place, then older generations
are removed, so a run killed at any moment leaves one complete state. Only rank 0 writes;
every rank reads the same state, so a run resumes with any number of ranks (the random
stream is shared by all ranks, see distributed.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from vdd_ros.core.distributed import DataParallel
from vdd_ros.errors import UserError

STATE_FORMAT = 1
TENSORS_FILE, META_FILE = 'state.safetensors', 'state.json'
GENERATION = 'gen-'


def state_folder(out: str | os.PathLike) -> Path:
    """Where the training state of checkpoint folder `out` lives: the sibling `<out>.state`."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + '.state')


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' shapes and values (the training data of a run)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


# -- state dicts as JSON plus named tensors -------------------------------------------------
def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-able data; tensors go to `tensors` under dotted keys and are referenced
    as `{"__tensor__": key}`, tuples and dicts with non-string keys are tagged."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to('cpu', copy=True).contiguous()
        return {'__tensor__': prefix}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, f'{prefix}.{k}', tensors) for k, v in obj.items()}
        return {'__items__': [[k, flatten(v, f'{prefix}.{k}', tensors)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {'__tuple__': [flatten(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f'{prefix}: cannot store a {type(obj).__name__} in a training state')


def unflatten(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `flatten`."""
    if isinstance(data, dict):
        if set(data) == {'__tensor__'}:
            return tensors[data['__tensor__']]
        if set(data) == {'__items__'}:
            return {k: unflatten(v, tensors) for k, v in data['__items__']}
        if set(data) == {'__tuple__'}:
            return tuple(unflatten(v, tensors) for v in data['__tuple__'])
        return {k: unflatten(v, tensors) for k, v in data.items()}
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    return data


def _state_of(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def _differences(saved: Any, now: Any, path: str = '') -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in [*saved, *(k for k in now if k not in saved)]:
            out += _differences(saved.get(key), now.get(key), f'{path}.{key}' if path else key)
        return out
    return [] if saved == now else [f'{path}: saved {saved!r}, now {now!r}']


@dataclass
class Saved:
    """One generation read back: its JSON metadata and its tensors."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class TrainingState:
    """Saves and restores the state of a job's training loops (`stages`, in order).

    `run` identifies the run (config, data fingerprint); resuming a state whose `run` differs
    is an error naming the first difference. Without `resume` a fresh run clears the folder.
    A loop calls `restore` once before its first iteration and `step` after every iteration.
    """

    def __init__(self, folder: str | os.PathLike, *, every: int, run: dict[str, Any],
                 stages: tuple[str, ...], resume: bool = False,
                 dp: DataParallel | None = None) -> None:
        self.folder, self.every = Path(folder), max(int(every), 1)
        self.run = json.loads(json.dumps(run))
        self.stages, self.dp = stages, dp or DataParallel()
        self.saved: Saved | None = None
        self._seq = 0
        if resume:
            self.saved = self._read_latest()
            self._notice(f'resuming {self.saved.meta["stage"]} at iteration '
                         f'{self.saved.meta["iteration"]} from {self.saved.path}'
                         if self.saved else
                         f'--resume: no training state in {self.folder}; starting afresh')
            if self.saved is not None:
                diffs = _differences(self.saved.meta.get('run'), self.run)
                if diffs:
                    raise UserError(f'{self.saved.path / META_FILE}: the saved state is of '
                                    f'another run ({diffs[0]}); rerun without --resume or '
                                    f'remove {self.folder}')
        elif self.dp.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        found = '' if self.saved is None else f'{self.saved.path.name}:{self.saved.meta}'
        self.dp.check_same(hashlib.sha256(found.encode()).hexdigest(), 'the training state '
                           'to resume', f'every rank must see the same {self.folder} (on a '
                           'filesystem shared by the nodes)')

    def _notice(self, text: str) -> None:
        if self.dp.is_main:
            print(text, file=sys.stderr)

    # -- reading ----------------------------------------------------------------------------
    def _generations(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir()
                 if p.is_dir() and p.name.startswith(GENERATION)
                 and p.name[len(GENERATION):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(GENERATION):]))

    def _read_latest(self) -> Saved | None:
        gens = self._generations()
        if not gens:
            return None
        path = gens[-1]
        self._seq = int(path.name[len(GENERATION):])
        try:
            meta = json.loads((path / META_FILE).read_text())
            tensors = load_file(str(path / TENSORS_FILE))
        except (OSError, ValueError, SafetensorError) as exc:
            raise UserError(f'{path}: unreadable training state ({exc})') from None
        if not isinstance(meta, dict) or meta.get('format') != STATE_FORMAT:
            raise UserError(f'{path / META_FILE}: unsupported training state format '
                            f'{meta.get("format") if isinstance(meta, dict) else meta!r}')
        if meta.get('stage') not in self.stages:
            raise UserError(f'{path / META_FILE}: stage {meta.get("stage")!r} is not one of '
                            f'this job ({", ".join(self.stages)})')
        return Saved(path, meta, tensors)

    def restore(self, stage: str, parts: Mapping[str, Any]
                ) -> tuple[int, list[tuple[int, float]]] | None:
        """Load the saved state into `parts` (modules, optimizers, schedulers, generators) if
        it is of `stage`: returns (first iteration to run, loss history so far); (0, []) when
        there is nothing to resume; None when the state is of a later stage (skip this one)."""
        if self.saved is None:
            return 0, []
        meta, tensors = self.saved.meta, self.saved.tensors
        here, there = self.stages.index(stage), self.stages.index(meta['stage'])
        if there != here:
            return None if there > here else (0, [])
        where = self.saved.path / TENSORS_FILE
        try:
            for name, obj in parts.items():
                _load_into(obj, unflatten(meta['parts'][name], tensors))
            torch.set_rng_state(tensors['rng.torch'])
            history = [(int(i), float(v)) for i, v in tensors['history'].tolist()]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(f'{where}: does not fit this run ({first})') from None
        return int(meta['iteration']), history

    # -- writing ----------------------------------------------------------------------------
    def step(self, stage: str, done: int, parts: Mapping[str, Any],
             history: list[tuple[int, float]], force: bool = False) -> None:
        """After `done` iterations of `stage`: save every `every` iterations, or when `force`."""
        if force or done % self.every == 0:
            self.save(stage, done, parts, history)

    def save(self, stage: str, done: int, parts: Mapping[str, Any],
             history: list[tuple[int, float]]) -> Path | None:
        """Write a new generation (rank 0 only) and remove the older ones."""
        if not self.dp.is_main:
            return None
        tensors: dict[str, torch.Tensor] = {}
        body = {name: flatten(_state_of(obj), name, tensors) for name, obj in parts.items()}
        tensors['history'] = torch.tensor(history, dtype=torch.float64).reshape(-1, 2)
        tensors['rng.torch'] = torch.get_rng_state()
        meta = {'format': STATE_FORMAT, 'stage': stage, 'iteration': int(done),
                'world_size': self.dp.world, 'run': self.run, 'parts': body}
        self._seq += 1
        name = f'{GENERATION}{self._seq:06d}'
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f'.{name}.tmp-{os.getpid()}'
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            (tmp / TENSORS_FILE).write_bytes(safetensors_bytes(tensors))
            (tmp / META_FILE).write_text(json.dumps(meta) + '\n')
            tmp.rename(self.folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.folder.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return self.folder / name

    def finish(self) -> None:
        """The job completed: its training state is no longer needed (rank 0 removes it)."""
        if self.dp.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
