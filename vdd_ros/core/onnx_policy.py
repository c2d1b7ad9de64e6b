"""Exported policies (`vdd-ros export`) acted out through onnxruntime, without torch.

An exported `.onnx` file carries its own description as JSON under the ONNX metadata key
`vdd_ros` (kind, method, spec: observation layout, action size, chunk sizes, task; binding;
opset; the teacher's sampler; train.seed, the training seed), so `load_onnx_policy` rebuilds
the same `Policy` as `load_policy` on the checkpoint folder: `reset(seed)`, `act(obs)`, the
action-chunk queue and, for a mixture, the expert modes with the per-episode expert memory.

Graphs (`batch` is a free dimension; the normalizers are inside the graphs):
- MoE (VDD-MoE, Gaussian BC, EM-MoE): `obs (batch, obs_horizon, obs_dim)`, `u (batch)` a
  uniform number in [0, 1), `expert (batch)` int64: an index pins that expert, SAMPLE (-1)
  draws one from the gating with `u`, ARGMAX (-2) takes the most probable. Outputs the chosen
  expert's mean `action (batch, action_horizon, action_dim)`, `expert_index (batch)` and the
  gating `logits (batch, num_experts)`.
- Teacher: one denoiser call, `x (batch, action_horizon * action_dim)` (normalised noisy
  chunk), `obs (batch, obs_horizon, obs_dim)`, `sigma (batch)` -> `denoised` (normalised) and
  `action (batch, action_horizon, action_dim)` (raw units). The Euler/Heun sampler loop runs
  here in numpy on the teacher's Karras schedule.

Random numbers: `reset(seed)` seeds a numpy copy of torch's CPU generator (TorchRandom) with
`noise_seed(seed, training seed)`, so an exported MoE draws the uniforms that choose its
experts, and the teacher the initial noise of its sampler, as the checkpoint's policy does for
the same seed: an exported policy acts out the same episodes.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from vdd_ros.core.config import EXPERT_MODES, check_expert_mode
from vdd_ros.core.policy import ChunkPolicy, PolicySpec, noise_seed, training_seed
from vdd_ros.errors import ConfigError, UserError

META_KEY = 'vdd_ros'
ONNX_FORMAT = 1
SAMPLE, ARGMAX = -1, -2          # codes of the `expert` input besides a pinned index
KINDS = ('moe', 'teacher')
_FLOAT, _INT64 = 'tensor(float)', 'tensor(int64)'


def graph_io(meta: dict[str, Any]) -> tuple[dict[str, tuple[str, list]], dict[str, tuple]]:
    """The inputs and outputs a graph of this metadata has: name -> (type, shape), where a
    shape entry is an int or 'batch' (any size)."""
    spec = PolicySpec.from_dict(meta['spec'])
    obs = (_FLOAT, ['batch', spec.obs_horizon, spec.obs_dim])
    action = (_FLOAT, ['batch', spec.action_horizon, spec.action_dim])
    if meta['kind'] == 'moe':
        z = int(meta['moe']['num_experts'])
        return ({'obs': obs, 'u': (_FLOAT, ['batch']), 'expert': (_INT64, ['batch'])},
                {'action': action, 'expert_index': (_INT64, ['batch']),
                 'logits': (_FLOAT, ['batch', z])})
    flat = (_FLOAT, ['batch', spec.action_horizon * spec.action_dim])
    return ({'x': flat, 'obs': obs, 'sigma': (_FLOAT, ['batch'])},
            {'denoised': flat, 'action': action})


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """The teacher's noise levels (DiffusionTeacher.sigmas), float32 as torch computes them."""
    if steps == 1:
        return np.array([sigma_max], dtype=np.float32)
    ramp = np.linspace(0, 1, steps).astype(np.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (np.float32(hi) + ramp * np.float32(lo - hi)) ** np.float32(rho)


class TorchRandom:
    """The random numbers of a seed as torch's CPU generator draws them (Mersenne Twister
    seeded with the seed's low 32 bits): `uniform()` is `torch.rand(())` exactly, `normal(n)`
    is `torch.randn(n)`, exactly below 16 values (double Box-Muller, one value kept for the
    next call) and to float32 rounding from 16 on (torch's vectorised Box-Muller over blocks of
    16, the last block redrawn)."""

    BLOCK = 256

    def __init__(self, seed: int | None = None) -> None:
        self.seed(seed)

    def seed(self, seed: int | None = None) -> None:
        seed = secrets.randbits(32) if seed is None else int(seed) & 0xFFFFFFFF
        self._state = np.random.RandomState(seed)
        self._raw: list[int] = []        # the next 32-bit outputs, the first last
        self._normal: float | None = None

    def _refill(self, n: int) -> None:
        while len(self._raw) < n:
            block = self._state.randint(0, 2 ** 32, size=self.BLOCK, dtype=np.uint32)
            self._raw = block[::-1].tolist() + self._raw

    def _take(self, n: int) -> np.ndarray:
        self._refill(n)
        out = self._raw[:-n - 1:-1]
        del self._raw[-n:]
        return np.array(out, dtype=np.uint64)

    def __call__(self) -> float:
        if not self._raw:
            self._refill(1)
        return (self._raw.pop() & 0xFFFFFF) * 2.0 ** -24

    def _floats(self, n: int) -> np.ndarray:
        return (self._take(n) & 0xFFFFFF).astype(np.float64) * 2.0 ** -24

    def _double(self) -> float:
        hi, lo = (int(v) for v in self._take(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0 ** -53

    def normal(self, n: int) -> np.ndarray:
        """`n` standard normal float32 numbers, as `torch.randn(n)` draws them."""
        if n < 16:
            out = []
            for _ in range(n):
                if self._normal is None:
                    u1, u2 = self._double(), self._double()
                    radius, theta = np.sqrt(-2.0 * np.log1p(-u2)), 2.0 * np.pi * u1
                    self._normal = radius * np.sin(theta)
                    out.append(radius * np.cos(theta))
                else:
                    out.append(self._normal)
                    self._normal = None
            return np.array(out, dtype=np.float32)
        data = self._floats(n)
        out = np.empty(n)
        for i in range(0, n - 15, 16):
            out[i:i + 16] = _box_muller_16(data[i:i + 16])
        if n % 16:
            out[n - 16:] = _box_muller_16(self._floats(16))
        return out.astype(np.float32)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    radius, theta = np.sqrt(-2.0 * np.log(1.0 - u[:8])), 2.0 * np.pi * u[8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])


class _Bound:
    """A session whose inputs and outputs are bound to preallocated batch-1 numpy arrays
    (no allocation per call): write `inputs[name][...]`, call `run()`, read `outputs`.
    (Measured with onnxruntime 1.32: a bound run takes a few microseconds; passing RunOptions
    to it, or `run_with_ort_values`, costs tens of microseconds more.)"""

    def __init__(self, session: Any, inputs: dict[str, tuple[tuple[int, ...], Any]],
                 outputs: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        self.session = session
        self.inputs = {k: np.zeros(shape, dtype) for k, (shape, dtype) in inputs.items()}
        self.outputs = {k: np.zeros(shape, dtype) for k, (shape, dtype) in outputs.items()}
        self._binding = session.io_binding()
        for name, arr in self.inputs.items():
            self._binding.bind_cpu_input(name, arr)
        for name, arr in self.outputs.items():
            self._binding.bind_output(name, 'cpu', 0, arr.dtype, list(arr.shape),
                                      arr.ctypes.data)

    def run(self) -> None:
        self.session.run_with_iobinding(self._binding)


class OnnxMoE:
    """A mixture's acting graph: chooses the expert (sample, argmax, per_episode, pinned) and
    returns its mean; the same attributes as MixtureOfExperts for acting."""

    kind = 'moe'

    def __init__(self, session: Any, meta: dict[str, Any]) -> None:
        spec = PolicySpec.from_dict(meta['spec'])
        self.session = session
        self.num_experts = int(meta['moe']['num_experts'])
        self.expert_mode: str | int = 'sample'
        self.set_expert_mode(meta['moe'].get('expert_mode', 'sample'))
        f32, i64 = np.float32, np.int64
        self._graph = _Bound(
            session, {'obs': ((1, spec.obs_horizon, spec.obs_dim), f32), 'u': ((1,), f32),
                      'expert': ((1,), i64)},
            {'action': ((1, spec.action_horizon, spec.action_dim), f32),
             'expert_index': ((1,), i64), 'logits': ((1, self.num_experts), f32)})
        self._obs, self._u, self._expert = (self._graph.inputs[k] for k in ('obs', 'u', 'expert'))
        self._action, self._index, self._logits = (
            self._graph.outputs[k] for k in ('action', 'expert_index', 'logits'))

    def set_expert_mode(self, mode: str | int) -> None:
        """'sample', 'argmax', 'per_episode', or a pinned expert index."""
        check_expert_mode(mode, self.num_experts)
        self.expert_mode = mode if mode in EXPERT_MODES else int(mode)
        self._episode_expert: int | None = None

    def reset(self) -> None:
        self._episode_expert = None

    def code(self) -> int:
        """The `expert` input for the current mode (before the per-episode expert is known:
        SAMPLE)."""
        mode = self.expert_mode
        if mode == 'sample':
            return SAMPLE
        if mode == 'argmax':
            return ARGMAX
        if mode == 'per_episode':
            return SAMPLE if self._episode_expert is None else self._episode_expert
        return int(mode)

    def run(self, window: np.ndarray, code: int, u: float = 0.0) -> np.ndarray:
        """One graph call on a window `(obs_horizon, obs_dim)` with the `expert` input `code`
        and the uniform `u`; returns the output buffer `action (1, action_horizon,
        action_dim)`, which the next call overwrites."""
        self._obs[0] = window
        self._u[0] = u
        self._expert[0] = code
        self._graph.run()
        return self._action

    def predict(self, window: np.ndarray, uniform: TorchRandom,
                diagnostics: bool = False) -> tuple[np.ndarray, dict[str, float]]:
        """One observation window `(obs_horizon, obs_dim)` -> `(action_horizon, action_dim)`."""
        code = self.code()
        action = self.run(window, code, uniform() if code == SAMPLE else 0.0)[0].copy()
        if self.expert_mode == 'per_episode':
            self._episode_expert = int(self._index[0])
        if not diagnostics:
            return action, {'expert': float(self._index[0])}
        logits = self._logits[0].astype(np.float64)
        log_gate = logits - logits.max()
        log_gate -= np.log(np.exp(log_gate).sum())
        return action, {'expert': float(self._index[0]),
                        'gating_entropy': float(-(np.exp(log_gate) * log_gate).sum())}


class OnnxTeacher:
    """The teacher's denoiser graph inside the Euler/Heun sampler loop (DiffusionTeacher.sample,
    in numpy)."""

    kind = 'teacher'

    def __init__(self, session: Any, meta: dict[str, Any]) -> None:
        spec = PolicySpec.from_dict(meta['spec'])
        t = meta['teacher']
        self.session = session
        self.sampling_steps = int(t['sampling_steps'])
        self.sampler = str(t['sampler'])
        self.sigma_min, self.sigma_max, self.rho = (float(t['sigma_min']),
                                                    float(t['sigma_max']), float(t['rho']))
        self.flat_act = spec.action_horizon * spec.action_dim
        f32 = np.float32
        self._graph = _Bound(
            session, {'x': ((1, self.flat_act), f32),
                      'obs': ((1, spec.obs_horizon, spec.obs_dim), f32), 'sigma': ((1,), f32)},
            {'denoised': ((1, self.flat_act), f32),
             'action': ((1, spec.action_horizon, spec.action_dim), f32)})
        self._x, self._obs, self._sigma = (self._graph.inputs[k] for k in ('x', 'obs', 'sigma'))

    def reset(self) -> None:
        """The teacher keeps nothing between episodes."""

    def sigmas(self, steps: int) -> np.ndarray:
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)

    def _denoise(self, x: np.ndarray, sigma: np.float32) -> np.ndarray:
        """D(x; sigma, s) (normalised) for the window in `_obs`; the raw chunk of it is left
        in the `action` output."""
        self._x[...] = x
        self._sigma[0] = sigma
        self._graph.run()
        return self._graph.outputs['denoised'].copy()

    def sample(self, window: np.ndarray, noise: np.ndarray,
               steps: int | None = None) -> np.ndarray:
        """Raw action chunk `(action_horizon, action_dim)` from standard normal `noise`
        `(action_horizon * action_dim,)`."""
        steps = self.sampling_steps if steps is None else int(steps)
        sigmas = self.sigmas(steps)
        self._obs[0] = window
        x = (np.asarray(noise, dtype=np.float32) * sigmas[0]).reshape(1, self.flat_act)
        for i in range(steps):
            sigma = sigmas[i]
            denoised = self._denoise(x, sigma)
            if i == steps - 1:
                return self._graph.outputs['action'][0].copy()
            nxt = sigmas[i + 1]
            d = (x - denoised) / sigma
            x_next = x + (nxt - sigma) * d
            if self.sampler == 'heun':
                d2 = (x_next - self._denoise(x_next, nxt)) / nxt
                x_next = x + (nxt - sigma) * (d + d2) / np.float32(2)
            x = x_next
        raise AssertionError('unreachable')

    def predict(self, window: np.ndarray, random: TorchRandom,
                diagnostics: bool = False) -> tuple[np.ndarray, dict[str, float]]:
        return self.sample(window, random.normal(self.flat_act)), {}


class OnnxPolicy(ChunkPolicy):
    """An exported policy: the chunk queue of `ChunkPolicy` around an onnxruntime model.

    `model` is an `OnnxMoE` or an `OnnxTeacher` (the attributes callers use on the torch
    models: `kind`, `expert_mode`, `num_experts`, `set_expert_mode`, `sampling_steps`);
    `meta` is the file's metadata.
    """

    def __init__(self, model: OnnxMoE | OnnxTeacher, spec: PolicySpec,
                 meta: dict[str, Any]) -> None:
        super().__init__(spec, training_seed(meta, 'metadata'))
        self.model = model
        self.meta = meta
        self._random = TorchRandom()

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        if seed is not None:
            self._random.seed(noise_seed(seed, self.training_seed))
        self.model.reset()

    def query(self, window: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return self.model.predict(window, self._random, self.diagnostics)


# -- loading ----------------------------------------------------------------------------------
def session_options(threads: int = 1) -> Any:
    """onnxruntime options for a control loop: `threads` intra-op threads (0: onnxruntime's
    default), one inter-op thread, no spinning between calls, every graph optimisation."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    opts.add_session_config_entry('session.inter_op.allow_spinning', '0')
    opts.log_severity_level = 3
    return opts


def _runtime_error(exc: Exception) -> str:
    """onnxruntime's reason without its source location and C++ signature."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r'^\[ONNXRuntimeError\] : \d+ : \w+ : ', '', text)
    text = re.sub(r'^\S+:\d+ .*?\) (?=[A-Z])', '', text)
    text = re.sub(r'^Load model from .* failed: ?', '', text)
    opset = re.search(r'Opset (\d+) is under development.*?support for domain (\S+) is till '
                      r'opset (\d+)', text)
    if opset:
        return (f'opset {opset[1]} is newer than this onnxruntime runs ({opset[2]} up to '
                f'opset {opset[3]}); export again with a lower --opset')
    return text if len(text) <= 200 else text[:197] + '...'


def make_session(source: str | bytes, threads: int = 1, name: str = '') -> Any:
    """An onnxruntime CPU session; UserError naming `name` when onnxruntime cannot run it."""
    import onnxruntime as ort
    try:
        return ort.InferenceSession(source, session_options(threads),
                                    providers=['CPUExecutionProvider'])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        label = name or (source if isinstance(source, str) else 'ONNX model')
        raise UserError(f'{label}: onnxruntime {ort.__version__} cannot load it '
                        f'({_runtime_error(exc)})') from None


def read_metadata(session: Any, name: str) -> dict[str, Any]:
    """The `vdd_ros` metadata of a session's model, checked; UserError naming the problem."""
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if raw is None:
        raise UserError(f'{name}: no {META_KEY!r} metadata (not a file written by '
                        '`vdd-ros export`)')
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f'{name}: {META_KEY!r} metadata is not JSON ({exc})') from None
    if not isinstance(meta, dict) or meta.get('format') != ONNX_FORMAT:
        got = meta.get('format') if isinstance(meta, dict) else meta
        raise UserError(f'{name}: unsupported {META_KEY!r} metadata format {got!r} '
                        f'(this version reads {ONNX_FORMAT})')
    training_seed(meta, f'{name}: metadata')
    kind = meta.get('kind')
    if kind not in KINDS:
        raise UserError(f'{name}: metadata kind: unknown {kind!r} (known: {", ".join(KINDS)})')
    try:
        spec = PolicySpec.from_dict(meta['spec'])
        if min(spec.obs_dim, spec.action_dim, spec.obs_horizon, spec.action_horizon) < 1 or \
                not 1 <= spec.action_exec <= spec.action_horizon:
            raise ValueError(f'sizes out of range: {spec}')
        if kind == 'moe':
            z = int(meta['moe']['num_experts'])
            if z < 1:
                raise ValueError(f'moe.num_experts must be >= 1, got {z}')
            check_expert_mode(meta['moe'].get('expert_mode', 'sample'), z, 'moe.expert_mode')
        else:
            t = meta['teacher']
            if int(t['sampling_steps']) < 1 or t['sampler'] not in ('euler', 'heun'):
                raise ValueError(f'teacher sampler: {t}')
            float(t['sigma_min']), float(t['sigma_max']), float(t['rho'])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        problem = f'missing {exc}' if isinstance(exc, KeyError) else str(exc)
        raise UserError(f'{name}: metadata: {problem}') from None
    _check_graph(session, meta, name)
    return meta


def _check_graph(session: Any, meta: dict[str, Any], name: str) -> None:
    """The graph's inputs and outputs are the ones the metadata describes (names, types,
    shapes); UserError naming the first that is not."""
    want_in, want_out = graph_io(meta)
    for role, want, got in (('input', want_in, session.get_inputs()),
                            ('output', want_out, session.get_outputs())):
        have = {a.name: (a.type, list(a.shape)) for a in got}
        if set(have) != set(want):
            raise UserError(f'{name}: graph {role}s {sorted(have)} differ from the metadata\'s '
                            f'{meta["kind"]} graph ({sorted(want)})')
        for key, (dtype, shape) in want.items():
            gtype, gshape = have[key]
            fits = gtype == dtype and len(gshape) == len(shape) and all(
                w == 'batch' or g == w for g, w in zip(gshape, shape))
            if not fits:
                raise UserError(f'{name}: {role} {key!r} is {gtype} {gshape}, the metadata '
                                f'(spec {_spec_text(meta)}) needs {dtype} {shape}')


def _spec_text(meta: dict[str, Any]) -> str:
    s = PolicySpec.from_dict(meta['spec'])
    return (f'obs {s.obs_horizon}x{s.obs_dim}, actions {s.action_horizon}x{s.action_dim}'
            + (f', {meta["moe"]["num_experts"]} experts' if meta['kind'] == 'moe' else ''))


def load_onnx_policy(path: str | os.PathLike, expert_mode: str | int | None = None,
                     steps: int | None = None, threads: int = 1) -> OnnxPolicy:
    """An exported `.onnx` file as a Policy, run by onnxruntime on `threads` CPU threads.

    `expert_mode` applies to mixtures, `steps` (sampling steps) to the teacher, as for
    `load_policy` on a checkpoint folder.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: exported policy file not found')
    if int(threads) < 0:
        raise UserError(f'threads: must be >= 0 (0: the onnxruntime default), got {threads}')
    session = make_session(str(path), int(threads), str(path))
    meta = read_metadata(session, str(path))
    spec = PolicySpec.from_dict(meta['spec'])
    if meta['kind'] == 'moe':
        model: OnnxMoE | OnnxTeacher = OnnxMoE(session, meta)
        if steps is not None:
            raise UserError(f'{path}: steps applies to teacher checkpoints, this is a moe')
        if expert_mode is not None:
            model.set_expert_mode(expert_mode)
    else:
        model = OnnxTeacher(session, meta)
        if expert_mode is not None:
            raise UserError(f'{path}: expert_mode applies to MoE checkpoints, this is a '
                            'teacher')
        if steps is not None:
            if int(steps) < 1:
                raise UserError(f'steps: must be >= 1, got {steps}')
            model.sampling_steps = int(steps)
    return OnnxPolicy(model, spec, meta)
