"""The torch-free acting path: an exported policy loads and acts without importing torch (or
onnx), and a bad file is one clear line at load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxkit import tiny_exports
from vdd_ros.core.checkpoint import load_policy
from vdd_ros.core.onnx_policy import META_KEY, karras_sigmas, load_onnx_policy
from vdd_ros.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    return tiny_exports(tmp_path_factory.mktemp('onnx'))


def test_loading_and_acting_import_no_torch(exports):
    """In a fresh interpreter: load_policy and policy_node's loader on .onnx files, reset, act,
    switch expert modes; then torch (and onnx, needed for export only) are not loaded."""
    code = textwrap.dedent(f'''
        import sys
        import numpy as np
        from vdd_ros.core.checkpoint import load_policy
        from vdd_ros.ros.policy_node import load_any_policy
        obs = np.linspace(-1, 1, 7).astype(np.float32)
        for path in {[str(p) for _, p in exports.values()]!r}:
            for policy in (load_policy(path), load_any_policy(path)):
                policy.reset(0)
                policy.diagnostics = True
                for _ in range(5):
                    assert np.all(np.isfinite(policy.act(obs)))
                if policy.model.kind == 'moe':
                    policy.model.set_expert_mode('per_episode')
                    policy.act(obs)
        loaded = sorted(m for m in ('torch', 'onnx', 'safetensors.torch') if m in sys.modules)
        print('loaded:', loaded)
    ''')
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == 'loaded: []', out.stdout


NODE_SCRIPT = '''
import json, sys
import numpy as np
from rclpy.parameter import Parameter
from rclpy.serialization import serialize_message
from vdd_ros.ros.conversions import array_to_msg
from vdd_ros.ros.policy_node import PolicyNode
from vdd_ros.ros.testing import ros_context
from vdd_ros.sim.tasks import get_task
path, obs = sys.argv[1], np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
fields = list(get_task('lift_carry').obs_fields)

class Recorder:
    def __init__(self):
        self.actions = []

    def publish(self, msg):
        if isinstance(msg, bytes):
            from rclpy.serialization import deserialize_message
            from std_msgs.msg import Float32MultiArray
            msg = deserialize_message(msg, Float32MultiArray)
        self.actions.append([float(v) for v in msg.data])

with ros_context() as context:
    params = {'checkpoint': path, 'task': 'lift_carry', 'seed': 5, 'control_rate_hz': 100.0,
              'obs_timeout_s': 5.0}
    node = PolicyNode(context=context, namespace='/onnx_node', parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    node.action_pub = Recorder()
    threads = node.policy.model.session.get_session_options().intra_op_num_threads
    for i, o in enumerate(obs):
        if i == len(obs) - 2:
            node.set_parameters([Parameter('expert_mode', value='2')])
        node._on_observation(serialize_message(array_to_msg(o, fields, {'seq': i + 1})))
        node._on_tick()
    node.destroy_node()
print(json.dumps({'actions': node.action_pub.actions, 'threads': threads,
                  'torch': 'torch' in sys.modules, 'onnx': 'onnx' in sys.modules}))
'''


def test_policy_node_runs_an_onnx_checkpoint_without_torch(tmp_path):
    """policy_node with checkpoint:=F.onnx (torch_threads at its default 1): onnxruntime on one
    thread, no torch in the process, and the actions of the torch checkpoint with the same seed
    (sampled experts, then a pinned one set at runtime)."""
    from vdd_ros.core.onnx_export import export_checkpoint
    from vdd_ros.ros.testing import tiny_moe_checkpoint
    from vdd_ros.sim.tasks import get_task
    ckpt = tiny_moe_checkpoint(tmp_path / 'moe', num_experts=3)
    export_checkpoint(ckpt, tmp_path / 'moe.onnx')
    obs = np.random.default_rng(0).normal(size=(12, get_task('lift_carry').obs_dim))
    env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    out = subprocess.run([sys.executable, '-c', NODE_SCRIPT, str(tmp_path / 'moe.onnx'),
                          json.dumps(obs.tolist())], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got['threads'] == 1 and not got['torch'] and not got['onnx']
    want = load_policy(ckpt)
    want.reset(5)
    expected = [want.act(o) for o in obs[:-2].astype(np.float32)]
    want.model.set_expert_mode(2)
    expected += [want.act(o) for o in obs[-2:].astype(np.float32)]
    np.testing.assert_allclose(np.array(got['actions']), np.array(expected), atol=1e-5)
    assert len({round(a[0], 4) for a in got['actions']}) > 1    # the experts differ


def test_onnxruntime_runs_on_one_thread_by_default(exports):
    session = load_policy(exports['vdd_moe'][1]).model.session
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    two = load_policy(exports['vdd_moe'][1], threads=2).model.session.get_session_options()
    assert two.intra_op_num_threads == 2


def test_the_karras_schedule_runs_from_sigma_max_to_sigma_min():
    sigmas = karras_sigmas(5, 0.05, 1.0, 7.0)
    assert sigmas.dtype == np.float32 and np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.05)
    assert karras_sigmas(1, 0.05, 1.0, 7.0).tolist() == [1.0]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    dst.write_bytes(proto.SerializeToString())
    return dst


def _set_meta(proto, change) -> None:
    entry = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta = json.loads(entry.value)
    change(meta)
    entry.value = json.dumps(meta)


def _no_meta(proto) -> None:
    del proto.metadata_props[:]


def _opset(version: int):
    def edit(proto) -> None:
        proto.opset_import[0].version = version
    return edit


def _spec(key: str, value):
    def edit(proto) -> None:
        _set_meta(proto, lambda m: m['spec'].__setitem__(key, value))
    return edit


BAD = {
    'no_metadata': (_no_meta, r"no 'vdd_ros' metadata \(not a file written by `vdd-ros export`\)"),
    'not_json': (lambda p: setattr(p.metadata_props[0], 'value', '{oops'),
                 "'vdd_ros' metadata is not JSON"),
    'format': (lambda p: _set_meta(p, lambda m: m.__setitem__('format', 9)),
               "unsupported 'vdd_ros' metadata format 9"),
    'kind': (lambda p: _set_meta(p, lambda m: m.__setitem__('kind', 'gan')),
             "metadata kind: unknown 'gan'"),
    'no_spec': (lambda p: _set_meta(p, lambda m: m.pop('spec')), "metadata: missing 'spec'"),
    'obs_dim': (_spec('obs_fields', [['eef', 3], ['cube', 5]]),
                r"input 'obs' is tensor\(float\) \['batch', 2, 7\], the metadata \(spec obs "
                r"2x8, actions 3x2, 4 experts\) needs tensor\(float\) \['batch', 2, 8\]"),
    'obs_horizon': (_spec('obs_horizon', 3), r"input 'obs' is .* needs tensor\(float\) "
                    r"\['batch', 3, 7\]"),
    'action_horizon': (_spec('action_horizon', 4), r"output 'action' is .*\['batch', 4, 2\]"),
    'experts': (lambda p: _set_meta(p, lambda m: m['moe'].__setitem__('num_experts', 5)),
                r"output 'logits' is .* needs tensor\(float\) \['batch', 5\]"),
    'teacher_graph': (lambda p: _set_meta(p, lambda m: m.__setitem__('kind', 'teacher') or
                                          m.__setitem__('teacher', {
                                              'sampling_steps': 4, 'sampler': 'euler',
                                              'sigma_min': 0.05, 'sigma_max': 1, 'rho': 7})),
                      r"graph inputs \['expert', 'obs', 'u'\] differ from the metadata's "
                      r"teacher graph \(\['obs', 'sigma', 'x'\]\)"),
    'exec': (_spec('action_exec', 9), 'metadata: sizes out of range'),
    'mode': (lambda p: _set_meta(p, lambda m: m['moe'].__setitem__('expert_mode', 'best')),
             'moe.expert_mode: must be one of'),
    'training_seed': (lambda p: _set_meta(p, lambda m: m.__setitem__('train', {'seed': 'x'})),
                      "metadata: train.seed: must be an integer >= 0, got 'x'"),
    'opset_too_new': (_opset(30), r'onnxruntime [\d.]+ cannot load it \(opset 30 is newer '
                      r'than this onnxruntime runs \(ai.onnx up to opset \d+\); export again '
                      r'with a lower --opset\)'),
    'opset_too_old': (_opset(1), r'onnxruntime [\d.]+ cannot load it \(This is an invalid '
                      r'model\. In Node'),
}


@pytest.mark.parametrize('case', list(BAD))
def test_a_bad_file_is_one_line_at_load(exports, tmp_path, case):
    edit, message = BAD[case]
    path = _rewrite(exports['vdd_moe'][1], tmp_path / 'bad.onnx', edit)
    with pytest.raises(UserError, match=message) as info:
        load_policy(path)
    text = str(info.value)
    assert '\n' not in text and text.startswith(str(path)) and len(text) < 400, text


def test_other_bad_inputs_are_one_line(exports, tmp_path):
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not a model')
    cases = [
        (lambda: load_policy(tmp_path / 'missing.onnx'), 'exported policy file not found'),
        (lambda: load_policy(garbage), 'cannot load it'),
        (lambda: load_policy(exports['teacher'][1], expert_mode='argmax'),
         'expert_mode applies to MoE checkpoints, this is a teacher'),
        (lambda: load_policy(exports['vdd_moe'][1], steps=3),
         'steps applies to teacher checkpoints'),
        (lambda: load_policy(exports['teacher'][1], steps=0), 'steps: must be >= 1'),
        (lambda: load_policy(exports['vdd_moe'][1], expert_mode=4),
         r'pinned expert 4 out of range \[0, 3\]'),
        (lambda: load_policy(exports['vdd_moe'][1], device='cuda'), 'runs on the CPU'),
        (lambda: load_onnx_policy(exports['vdd_moe'][1], threads=-1), 'threads: must be >= 0'),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as info:
            call()
        assert '\n' not in str(info.value)


def test_a_wrong_observation_size_is_refused_before_the_graph_runs(exports):
    policy = load_policy(exports['vdd_moe'][1])
    with pytest.raises(ValueError, match='observation has 6 values, policy expects 7'):
        policy.act(np.zeros(6, np.float32))
