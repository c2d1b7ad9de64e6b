"""`vdd-ros export`: every policy kind as ONNX, acting like the torch checkpoint.

Parity: for fixed random numbers the onnxruntime actions equal torch's to 1e-5 on 1,000
observation windows per kind (and per expert mode for mixtures); the loaded policy follows
the checkpoint's policy step by step (same seeds, same experts, same chunk queue).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml

from onnxkit import KINDS, OBS_FIELDS, tiny_checkpoint, tiny_exports
from vdd_ros.cli import main
from vdd_ros.core.checkpoint import load_model, load_policy
from vdd_ros.core.onnx_export import export_checkpoint, max_difference
from vdd_ros.core.onnx_policy import META_KEY, OnnxPolicy, TorchRandom
from vdd_ros.core.policy import noise_seed
from vdd_ros.errors import UserError

MOES = ('vdd_moe', 'shared_moe', 'gaussian_bc', 'em_moe')
TEACHERS = ('teacher', 'teacher_heun')


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    return tiny_exports(tmp_path_factory.mktemp('onnx'))


def test_torch_random_draws_what_torch_draws_for_the_same_seed():
    for seed in (0, 7, 2 ** 32 + 3):
        gen = torch.Generator().manual_seed(seed)
        want = [float(torch.rand((), generator=gen)) for _ in range(300)]
        want += torch.rand(5, 1, generator=gen).ravel().tolist()
        random = TorchRandom(seed)
        assert [random() for _ in range(305)] == want
    for n in (7, 15, 16, 24, 56, 300):       # serial below 16 values, vectorised from 16
        gen, random = torch.Generator().manual_seed(n), TorchRandom(n)
        for _ in range(3):                    # the kept value and the stream carry over
            want = torch.randn(1, n, generator=gen)[0].numpy()
            got = random.normal(n)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
            if n < 16:
                np.testing.assert_array_equal(got, want)
        assert random() == float(torch.rand((), generator=gen))


@pytest.mark.parametrize('method, mode', [
    (m, mode) for m in MOES for mode in ('sample', 'argmax', 'per_episode', 'pinned')
    if m != 'gaussian_bc' or mode == 'sample'])   # one expert: every mode is the same
def test_moe_actions_equal_torch_on_1000_observations(exports, method, mode):
    """1,000 windows in sample mode, 200 in the others."""
    ckpt, path = exports[method]
    model = load_model(ckpt)[0]
    policy = load_policy(path)
    mode = model.num_experts - 1 if mode == 'pinned' else mode
    model.set_expert_mode(mode)
    policy.model.set_expert_mode(mode)
    count = 1000 if mode == 'sample' else 200
    worst, biggest = max_difference(model, policy.model, policy.spec, count)
    assert worst <= 1e-5 and biggest > 0.5, (worst, biggest)


@pytest.mark.parametrize('method', TEACHERS)
def test_teacher_actions_equal_torch_on_1000_observations(exports, method):
    ckpt, path = exports[method]
    policy = load_policy(path)
    model = load_model(ckpt)[0]
    assert policy.model.sampler == model.cfg.sampler
    worst, biggest = max_difference(model, policy.model, policy.spec, 1000)
    assert worst <= 1e-5 and biggest > 0.5, (worst, biggest)
    # the sampler outside the graph runs the teacher's own noise schedule
    for steps in (1, 2, 8):
        np.testing.assert_allclose(policy.model.sigmas(steps), model.sigmas(steps).numpy(),
                                   rtol=1e-6)


@pytest.mark.parametrize('method', ['vdd_moe', 'shared_moe'])
def test_the_moe_graph_chooses_the_expert_the_gating_gives(exports, method):
    """Each u lands in the expert whose slice of the gating CDF holds it; argmax and pinned
    indices are the codes' experts."""
    session = load_policy(exports[method][1]).model.session
    obs = np.random.default_rng(1).standard_normal((1, 2, 7)).astype(np.float32)

    def run(u: float, code: int) -> list:
        return session.run(None, {'obs': obs, 'u': np.array([u], np.float32),
                                  'expert': np.array([code], np.int64)})
    logits = run(0.5, -1)[2][0].astype(np.float64)
    cdf = np.cumsum(np.exp(logits - logits.max()))
    cdf /= cdf[-1]
    assert np.diff(cdf).min() > 0.01          # every expert has a slice to land in
    for k in range(4):
        low = cdf[k - 1] if k else 0.0
        assert run((low + cdf[k]) / 2, -1)[1][0] == k
        assert run(0.3, k)[1][0] == k
    assert run(0.3, -2)[1][0] == int(np.argmax(logits))
    # a pinned expert's action is the same whatever u is, and differs between experts
    np.testing.assert_array_equal(run(0.1, 2)[0], run(0.9, 2)[0])
    assert not np.allclose(run(0.1, 2)[0], run(0.1, 1)[0])


@pytest.mark.parametrize('method', list(KINDS))
def test_the_loaded_policy_acts_like_the_checkpoint_with_the_same_seeds(exports, method):
    ckpt, path = exports[method]
    modes = ['sample', 'per_episode', 'argmax', 0] if method in MOES else [None]
    for mode in modes:
        want, got = load_policy(ckpt, expert_mode=mode), load_policy(path, expert_mode=mode)
        assert isinstance(got, OnnxPolicy) and got.spec == want.spec
        want.diagnostics = got.diagnostics = method in MOES
        rng = np.random.default_rng(3)
        experts = set()
        for episode in range(4):
            want.reset(episode)
            got.reset(episode)
            for t in range(9):
                obs = rng.standard_normal(7).astype(np.float32)
                a, b = want.act(obs), got.act(obs)
                np.testing.assert_allclose(b, a, atol=1e-5)   # teacher: torch's noise too
                if method in MOES:
                    assert got.info['expert'] == want.info['expert']
                    assert got.info['gating_entropy'] == pytest.approx(
                        want.info['gating_entropy'], abs=1e-5)
                    experts.add(got.info['expert'])
                assert b.shape == (2,) and b.dtype == np.float32
                np.testing.assert_allclose(got.pending(), want.pending(), atol=1e-5)
        if mode == 'sample' and method != 'gaussian_bc':
            assert len(experts) > 1      # the choice really varies with the seeds


def test_the_teacher_noise_is_the_seeds(exports):
    policy = load_policy(exports['teacher'][1])
    obs = np.ones(7, np.float32)
    runs = []
    for seed in (1, 1, 2):
        policy.reset(seed)
        runs.append(policy.act(obs))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])
    assert load_policy(exports['teacher'][1], steps=1).model.sampling_steps == 1


def test_the_metadata_describes_the_policy(exports, tmp_path):
    for method, (ckpt, path) in exports.items():
        proto = onnx.load(str(path))
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
        assert meta['method'] == method and meta['format'] == 1 and meta['binding'] is None
        assert meta['kind'] == ('teacher' if method in TEACHERS else 'moe')
        assert meta['spec']['obs_fields'] == [list(f) for f in OBS_FIELDS]
        assert (meta['spec']['obs_horizon'], meta['spec']['action_horizon'],
                meta['spec']['action_exec']) == (2, 3, 2)
        assert meta['opset'] == 17 and proto.opset_import[0].version == 17
        assert meta['inputs']['obs']['shape'] == ['batch', 2, 7]
        assert meta['outputs']['action']['shape'] == ['batch', 3, 2]
    em = json.loads(onnx.load(str(exports['em_moe'][1])).metadata_props[0].value)
    assert em['moe']['num_experts'] == 3 and em['moe']['expert_mode'] == 'argmax'
    assert em['moe']['experts'] == 'independent'
    shared = json.loads(onnx.load(str(exports['shared_moe'][1])).metadata_props[0].value)
    assert shared['moe']['experts'] == 'shared'
    assert load_policy(exports['em_moe'][1]).model.expert_mode == 'argmax'
    heun = json.loads(onnx.load(str(exports['teacher_heun'][1])).metadata_props[0].value)
    assert heun['teacher']['sampler'] == 'heun' and heun['teacher']['sampling_steps'] == 3


@pytest.mark.parametrize('method', ['vdd_moe', 'shared_moe'])
def test_a_batch_of_windows_in_one_call(exports, method):
    """The graphs take any batch size (the batch-1 acting path is one case); each row gets
    its own expert's mean, as torch's batched predict gives it."""
    policy = load_policy(exports[method][1])
    windows = np.random.default_rng(0).standard_normal((5, 2, 7)).astype(np.float32)
    codes = np.array([-2, 0, 1, 2, 3], np.int64)
    out = policy.model.session.run(None, {'obs': windows, 'u': np.full(5, 0.5, np.float32),
                                          'expert': codes})
    assert out[0].shape == (5, 3, 2) and out[1].shape == (5,) and out[2].shape == (5, 4)
    single = policy.model.session.run(None, {'obs': windows[3:4], 'u': np.full(1, 0.5,
                                                                                np.float32),
                                             'expert': codes[3:4]})
    np.testing.assert_allclose(out[0][3], single[0][0], atol=1e-6)
    model = load_model(exports[method][0])[0]
    for row, code in enumerate(codes):
        model.set_expert_mode('argmax' if code == -2 else int(code))
        want = model.predict(torch.from_numpy(windows[row:row + 1]))[0][0].detach().numpy()
        np.testing.assert_allclose(out[0][row], want, atol=1e-5)


def test_the_export_command(exports, tmp_path, capsys):
    ckpt = exports['vdd_moe'][0]
    out = tmp_path / 'cli' / 'p.onnx'
    assert main(['export', '--policy', str(ckpt), '--out', str(out), '--check', '50',
                 '--expert-mode', '2', '--opset', '18']) == 0
    text = capsys.readouterr().out
    assert 'parity on 50 observation windows' in text and 'expert_mode 2' in text
    policy = load_policy(out)
    assert policy.model.expert_mode == 2 and policy.meta['opset'] == 18
    assert main(['export', '--policy', str(exports['teacher'][0]), '--out', str(out),
                 '--steps', '2', '--check', '20']) == 0
    assert load_policy(out).model.sampling_steps == 2


@pytest.mark.parametrize('args, message', [
    (['--out', '{tmp}/x.pt'], 'must name a .onnx file'),
    (['--opset', '30'], '--opset: must be in [17, 20], got 30'),
    (['--expert-mode', '9'], 'pinned expert 9 out of range'),
    (['--steps', '3'], '--steps applies to teacher checkpoints'),
    (['--binding', 'task:lift_carry'], '--binding: lift_carry has observation'),
    (['--check', '-1'], '--check: must be >= 0'),
])
def test_bad_export_arguments_are_one_line(exports, tmp_path, capsys, args, message):
    argv = ['export', '--policy', str(exports['vdd_moe'][0]), '--out', str(tmp_path / 'x.onnx')]
    argv += [a.replace('{tmp}', str(tmp_path)) for a in args]
    if '--out' in args:
        del argv[3:5]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('vdd-ros export: error: ') and '\n' not in err and message in err, err
    assert not (tmp_path / 'x.onnx').exists()


def test_bench_reports_onnxruntime_next_to_torch_and_the_floor():
    from vdd_ros.core.bench import latency_benchmark
    r = latency_benchmark(obs_dim=10, action_dim=3, hidden_dim=32, num_layers=2, num_experts=4,
                          steps=(1, 2), calls=200, warmup=10)
    for key in ('moe', 'moe_forward', 'onnx_moe', 'onnx_moe_run'):
        assert 0 < r[key]['p50'] <= r[key]['p99'], key
    assert set(r['onnx_teacher']) == {'1', '2'} and r['onnx_moe_over_torch'] > 0
    # independent experts: gating encoder 10->64->64->4 (MoEConfig's gating width), the
    # chosen expert 10->32->32 and its mean 32->3
    shapes = [(10, 64), (64, 64), (64, 4), (10, 32), (32, 32), (32, 3)]
    assert r['floor']['shapes'] == [list(s) for s in shapes]
    assert r['floor']['flops'] == sum(2 * a * b for a, b in shapes)
    assert 0 < r['floor']['floor_ms'] < r['onnx_moe']['p50']


def test_closed_loop_onnx_matches_torch_on_the_same_seeds(tmp_path):
    """lift_carry in robosuite: the exported MoE (sample mode, observation window 2, chunks of
    4 with 2 executed) gives the torch checkpoint's episodes: the same actions step by step,
    hence the same success, mode and length."""
    pytest.importorskip('robosuite')
    from vdd_ros.core.checkpoint import save_checkpoint
    from vdd_ros.core.config import MoEConfig
    from vdd_ros.core.moe import MixtureOfExperts
    from vdd_ros.core.onnx_export import export_checkpoint
    from vdd_ros.core.policy import PolicySpec
    from vdd_ros.sim.rollout import cached_env, evaluation_seeds, run_episode
    from vdd_ros.sim.tasks import get_task
    task = get_task('lift_carry')
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=3, hidden_dim=32, num_layers=1),
                           task.obs_dim, task.action_dim, 2, 4)
    with torch.no_grad():
        moe.mean_head.bias.view(-1).copy_(torch.linspace(-0.9, 0.9, 3).repeat_interleave(moe.dim))
        moe.gate[-1].weight.normal_(0, 0.5)
    spec = PolicySpec(obs_fields=list(task.obs_fields), action_dim=task.action_dim,
                      obs_horizon=2, action_horizon=4, action_exec=2, task=task.name)
    ckpt = save_checkpoint(tmp_path / 'moe', moe, spec, 'vdd_moe')
    export_checkpoint(ckpt, tmp_path / 'moe.onnx')
    env = cached_env(task.name)
    policies = [load_policy(p) for p in (ckpt, tmp_path / 'moe.onnx')]
    for seed in evaluation_seeds(2):
        want, got = (run_episode(env, policy, seed, record=True) for policy in policies)
        np.testing.assert_allclose(got['actions'], want['actions'], atol=1e-5)
        assert len(np.unique(want['actions'][:, 0].round(3))) > 1   # the expert changes
        assert (got['success'], got['mode'], got['length']) == \
            (want['success'], want['mode'], want['length'])


@pytest.mark.parametrize('method', ['vdd_moe', 'teacher'])
def test_each_training_seed_draws_its_own_noise_in_an_episode(tmp_path, method):
    """Checkpoints of different training seeds draw different noise in the same episode (the
    evaluations of several training seeds are independent samples); training seed s acts in
    episode e as training seed 0 acts in episode noise_seed(e, s); the exported file records
    its training seed and acts like its checkpoint."""
    first = tiny_checkpoint(tmp_path / 'seed_0', method)
    third = shutil.copytree(first, tmp_path / 'seed_3')
    meta = yaml.safe_load((third / 'config.yaml').read_text())
    meta['train'] = {'seed': 3}
    (third / 'config.yaml').write_text(yaml.safe_dump(meta, sort_keys=False))
    export_checkpoint(third, tmp_path / 'seed_3.onnx')
    zero, three = load_policy(first), load_policy(third)
    exported = load_policy(tmp_path / 'seed_3.onnx')
    assert (zero.training_seed, three.training_seed, exported.training_seed) == (0, 3, 3)
    assert exported.meta['train'] == {'seed': 3}
    obs = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32)

    def episode(policy, seed):
        policy.reset(seed)
        return np.stack([policy.act(o) for o in obs])
    differ = 0
    for e in range(8):
        mine = episode(three, e)
        np.testing.assert_array_equal(mine, episode(zero, noise_seed(e, 3)))
        np.testing.assert_allclose(episode(exported, e), mine, atol=1e-5)
        differ += not np.allclose(mine, episode(zero, e))
    assert differ >= 4, differ
    assert noise_seed(7, 0) == 7 and noise_seed(2 ** 32 + 7, 0) == 7
    assert len({noise_seed(e, s) for e in range(100) for s in range(10)}) == 1000


def test_a_bad_training_seed_is_one_line_at_load(exports, tmp_path):
    bad = shutil.copytree(exports['vdd_moe'][0], tmp_path / 'bad')
    meta = yaml.safe_load((bad / 'config.yaml').read_text())
    meta['train'] = {'seed': -2}
    (bad / 'config.yaml').write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(UserError, match=r'config.yaml: train.seed: must be an integer >= 0, '
                                        r'got -2$'):
        load_policy(bad)
