"""Property tests of the inputs a user hands the CLI: `--set` overrides, config mappings and
files, the pipeline config loader, and broken HDF5 datasets.

Each gives either a valid result or one clear UserError/ConfigError (one line, naming the file,
the field or the demo and key), never another exception. Each property counts its generated
cases and how many of them were valid (printed at the end of the module with `-s`).
"""
from __future__ import annotations

import itertools
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdd_ros.core.config import (ConfigError, TrainConfig, apply_overrides, from_dict,
                                 load_config, parse_overrides, to_dict)
from vdd_ros.core.data import MAX_ABS_VALUE, load_dataset
from vdd_ros.errors import UserError
from vdd_ros.pipeline import PipelineConfig, flatten, load_pipeline_config

CASES: Counter = Counter()
VALID: Counter = Counter()
FAST = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TMP = tempfile.TemporaryDirectory(prefix='vdd_ros_fuzz_')
_names = itertools.count()

LEAVES = sorted(flatten(to_dict(TrainConfig())))
SECTIONS = sorted({leaf.split('.')[0] for leaf in LEAVES})
PIPELINE_FIELDS = sorted(f for f in to_dict(PipelineConfig()) if f != 'train')
text = st.text(st.characters(blacklist_categories=('Cs',)), max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5000), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), text,
    st.sampled_from(['sample', 'argmax', 'per_episode', 'euler', 'heun', 'diag', 'full',
                     '1e30', '1.0e-3', '.nan', '-.inf', '0x10', 'yes', '~', '3']))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(text, inner, max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(LEAVES + SECTIONS), text)
# values a field accepts, so that valid configs are generated as well as broken ones
plausible = st.one_of(st.integers(1, 64), st.floats(0.01, 0.9),
                      st.sampled_from(['sample', 'argmax', 'euler', 'heun', 'diag', 'full']))
field_values = st.one_of(plausible, plausible, plausible, values)


@pytest.fixture(scope='module', autouse=True)
def report_counts():
    yield
    print('\ngenerated cases per property:', dict(CASES), '; valid among them:', dict(VALID))
    TMP.cleanup()


def _one_line(exc: Exception, start: str = '') -> None:
    message = str(exc)
    assert isinstance(exc, (UserError, ConfigError)), repr(exc)
    assert message and '\n' not in message and message.startswith(start), message


def _finite(config) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v)
               for v in flatten(to_dict(config)).values())


def _yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()


override_items = st.one_of(
    st.builds(lambda k, v: f'{k}={v}', st.sampled_from(LEAVES), field_values.map(_yaml_text)),
    st.builds(lambda k, v: f'{k}={v}', st.sampled_from(LEAVES), field_values.map(_yaml_text)),
    st.builds(lambda k, v: f'{k}={v}', keys, st.one_of(values.map(_yaml_text), text)),
    text)


@FAST
@given(items=st.lists(override_items, max_size=4))
def test_set_overrides_give_one_error_or_a_valid_train_config(items):
    CASES['--set'] += 1
    try:
        overrides = parse_overrides(items)
        cfg = from_dict(TrainConfig, apply_overrides(to_dict(TrainConfig()), overrides),
                        '--set')
    except Exception as exc:  # noqa: BLE001 -- the property: only the documented errors
        _one_line(exc)
        return
    VALID['--set'] += 1
    assert isinstance(cfg, TrainConfig) and _finite(cfg)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_numbers_that_yaml_reads_as_text_and_numbers_no_field_can_use():
    def build(*items):
        return from_dict(TrainConfig, apply_overrides(to_dict(TrainConfig()),
                                                      parse_overrides(items)), '--set')
    assert build('teacher.lr=1e30', 'vdd.lr=2E-4').teacher.lr == 1e30   # YAML 1.1: text
    for item, message in (('teacher.lr=.nan', 'teacher.lr: expected a finite number'),
                          ('vdd.grad_clip=-.inf', 'vdd.grad_clip: expected a finite number'),
                          ('seed=-1', 'seed: must be >= 0'),
                          ('seed=99999999999999999999', 'seed: must lie in'),
                          ('teacher.lr=fast', "teacher.lr: expected a number, got 'fast'"),
                          ('vdd=[1', 'not valid YAML'),
                          ('vdd=&x [*x]', 'refers to itself')):
        with pytest.raises(ConfigError, match=message):
            build(item)


@st.composite
def train_mappings(draw):
    """A training config mapping: known sections and fields with any values, plus any keys."""
    out = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=4, unique=True)):
        fields = [leaf.split('.', 1)[1] for leaf in LEAVES if leaf.startswith(section + '.')]
        if not fields:
            out[section] = draw(values)
            continue
        out[section] = draw(st.dictionaries(st.sampled_from(fields), field_values,
                                            max_size=3))
    if draw(st.integers(0, 3)) == 0:   # anything, anywhere
        out.update(draw(st.dictionaries(keys, values, max_size=2)))
    return out


@FAST
@given(data=train_mappings())
def test_config_mappings_give_one_error_or_a_valid_config(data):
    CASES['mapping'] += 1
    try:
        cfg = from_dict(TrainConfig, data, 'train.yaml')
    except Exception as exc:  # noqa: BLE001
        _one_line(exc, 'train.yaml: ')
        return
    VALID['mapping'] += 1
    assert _finite(cfg) and from_dict(TrainConfig, to_dict(cfg)) == cfg


@FAST
@given(content=st.one_of(text, st.text(max_size=60), train_mappings().map(yaml.safe_dump),
                         st.sampled_from(['a: &x [*x]', '[' * 3000, 'vdd: {iterations: 1e3}',
                                          '!!python/object/apply:os.system [ls]', '- 1',
                                          'teacher: {lr: .inf}', 'seed: -1', '\x00\xff'])))
def test_any_text_as_a_config_file(content):
    CASES['config file'] += 1
    path = Path(TMP.name) / f'train_{next(_names)}.yaml'
    path.write_text(content, errors='surrogateescape')
    try:
        cfg = load_config(TrainConfig, path)
    except Exception as exc:  # noqa: BLE001
        _one_line(exc, f'{path}: ')
        return
    finally:
        path.unlink()
    VALID['config file'] += 1
    assert isinstance(cfg, TrainConfig) and _finite(cfg)


@st.composite
def pipeline_mappings(draw):
    section = st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(PIPELINE_FIELDS),
                                  st.sampled_from(LEAVES).map(lambda k: f'train.{k}')),
                        field_values, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(PIPELINE_FIELDS + ['train']), text), values,
                        max_size=3))
    data = {}
    if draw(st.booleans()):
        data['defaults'] = draw(section)
    if draw(st.booleans()):
        data['tasks'] = draw(st.dictionaries(
            st.one_of(st.sampled_from(['lift_carry', 'pick_either', 'stack_either']), text),
            st.one_of(section, values), max_size=2))
    if draw(st.integers(0, 3)) == 0:
        data.update(draw(st.dictionaries(text, values, max_size=1)))
    return data


@SLOW
@given(data=pipeline_mappings(), items=st.lists(st.one_of(
    st.builds(lambda k, v: f'{k}={v}', st.one_of(st.sampled_from(PIPELINE_FIELDS),
                                                  st.sampled_from(LEAVES).map('train.'.__add__)),
                                                  field_values.map(_yaml_text)), text),
    max_size=2))
def test_pipeline_config_loader_gives_one_error_or_a_valid_config(data, items):
    CASES['pipeline config'] += 1
    path = Path(TMP.name) / f'pipeline_{next(_names)}.yaml'
    path.write_text(yaml.safe_dump(data))
    try:
        cfg = load_pipeline_config('lift_carry', path, parse_overrides(items))
        train = cfg.train_config()
    except Exception as exc:  # noqa: BLE001
        _one_line(exc)
        return
    finally:
        path.unlink()
    VALID['pipeline config'] += 1
    assert isinstance(cfg, PipelineConfig) and _finite(train)
    json.dumps(to_dict(cfg), default=str)   # the stage key of the report hashes it


# -- broken HDF5 datasets ---------------------------------------------------------------------
ARRAYS = ['actions', 'obs/a', 'obs/b']
BAD_VALUES = [np.nan, np.inf, -np.inf, 3e38, -1e300, MAX_ABS_VALUE * 1.5]


def _write_base(f: h5py.File, lengths: list[int]) -> None:
    rng = np.random.default_rng(0)
    data = f.create_group('data')
    data.attrs['env_args'] = json.dumps({'task': 'lift_carry'})
    data.attrs['obs_fields'] = json.dumps([['a', 2], ['b', 1]])
    for i, T in enumerate(lengths):
        g = data.create_group(f'demo_{i}')
        g.create_dataset('obs/a', data=rng.normal(size=(T, 2)).astype(np.float32))
        g.create_dataset('obs/b', data=rng.normal(size=(T, 1)))
        g.create_dataset('actions', data=rng.uniform(-1, 1, size=(T, 2)))
        g.attrs['mode'] = 'left'
        g.attrs['seed'] = i
    f.create_dataset('mask/train', data=np.array([f'demo_{i}' for i in range(len(lengths))],
                                                 dtype='S'))


def _replace(f: h5py.File, key: str, value) -> None:
    if key in f:
        del f[key]
    f[key] = value


@st.composite
def mutations(draw, n_demos: int):
    demo = f'data/demo_{draw(st.integers(0, max(n_demos - 1, 0)))}'
    key = draw(st.sampled_from(ARRAYS))
    kind = draw(st.sampled_from(['value', 'value', 'drop', 'shape', 'dtype', 'attr',
                                 'demo_attr', 'mask', 'rename', 'link']))
    if kind == 'value':
        return kind, demo, key, draw(st.sampled_from(BAD_VALUES)), draw(st.integers(0, 50))
    if kind == 'drop':
        return kind, draw(st.sampled_from(['data', demo, f'{demo}/obs', f'{demo}/{key}',
                                           'mask', 'mask/train']))
    if kind == 'shape':
        return kind, demo, key, draw(st.sampled_from([(5,), (5, 0), (5, 2, 2), (6, 2), (),
                                                      (0, 2), (0,), (5, 3)]))
    if kind == 'dtype':
        return kind, demo, key, draw(st.sampled_from(['S3', 'c8', '?', 'i1', 'f2', 'u8',
                                                      'compound', 'vlen']))
    if kind == 'attr':
        return kind, draw(st.sampled_from(['obs_fields', 'env_args'])), draw(st.one_of(
            text, st.integers(), values.map(json.dumps),
            st.sampled_from(['[["a", 2], ["zz", 1]]', '[["a"]]', '[]', '[["", 1]]'])))
    if kind == 'demo_attr':
        return kind, demo, draw(st.sampled_from(['seed', 'mode'])), draw(st.one_of(
            text, st.integers(-2**70, 2**70), st.floats(), st.lists(st.integers(), max_size=3)))
    if kind == 'mask':
        return kind, draw(st.sampled_from(['ints', 'group', 'names']))
    if kind == 'rename':
        return kind, demo, draw(st.sampled_from(['demo_x', 'demo_01', 'demo_-1', 'demo_999']))
    return kind, f'{demo}/{key}'


def _apply(f: h5py.File, mutation: tuple) -> None:
    kind, *args = mutation
    if kind == 'value':
        path, key, value, index = args
        if path + '/' + key in f and isinstance(f[path][key], h5py.Dataset):
            arr = np.asarray(f[path][key][()], dtype=np.float64)
            if arr.size:
                arr.flat[index % arr.size] = value
                _replace(f, f'{path}/{key}', arr)
    elif kind == 'drop':
        if args[0] in f:
            del f[args[0]]
    elif kind == 'shape':
        path, key, shape = args
        if path in f:
            _replace(f, f'{path}/{key}', np.zeros(shape))
    elif kind == 'dtype':
        path, key, dtype = args
        if path not in f:
            return
        if dtype == 'compound':
            value = np.zeros(5, dtype=[('x', 'f4'), ('y', 'i4')])
        elif dtype == 'vlen':
            value = np.array(['ab', 'c'] * 3, dtype=h5py.string_dtype())
        else:
            value = np.ones((5, 2), dtype=dtype)
        _replace(f, f'{path}/{key}', value)
    elif kind == 'attr':
        if 'data' in f:
            f['data'].attrs[args[0]] = args[1]
    elif kind == 'demo_attr':
        path, name, value = args
        if path in f:
            f[path].attrs[name] = np.asarray(value) if isinstance(value, list) else value
    elif kind == 'mask':
        value = {'ints': np.arange(3), 'names': np.array([b'demo_7', b'nope', b''])}
        if args[0] == 'group':
            _replace(f, 'mask/train', np.zeros(0))
            del f['mask/train']
            f.create_group('mask/train')
        else:
            _replace(f, 'mask/valid', value[args[0]])
    elif kind == 'rename':
        path, name = args
        if path in f and f'data/{name}' not in f:
            f.move(path, f'data/{name}')
    elif kind == 'link':
        if 'data' in f:
            _replace(f, args[0], h5py.SoftLink('/nowhere'))


@st.composite
def broken_files(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    changes = draw(st.lists(mutations(len(lengths)), max_size=3)) if draw(st.booleans()) \
        else []
    if draw(st.integers(0, 3)) == 0:   # a demo turned into an array (not a group)
        changes.append(('demo_as_array',))
    keys = draw(st.one_of(st.none(), st.lists(st.sampled_from(['a', 'b', 'zz', '', 'a/x']),
                                              max_size=3)))
    return lengths, changes, keys


@SLOW
@given(case=broken_files())
def test_broken_hdf5_files_load_or_fail_with_one_line_naming_the_problem(case):
    lengths, changes, keys = case
    CASES['hdf5 dataset'] += 1
    path = Path(TMP.name) / f'd_{next(_names)}.hdf5'
    with h5py.File(path, 'w') as f:
        _write_base(f, lengths)
        for change in changes:
            if change[0] == 'demo_as_array' and 'data/demo_0' in f:
                _replace(f, 'data/demo_0', np.zeros((3, 2)))
            elif change[0] != 'demo_as_array':
                try:
                    _apply(f, change)
                except (OSError, KeyError, TypeError, ValueError):
                    pass   # a change that does not apply to this file (its target is gone)
    try:
        data = load_dataset(path, keys)
    except Exception as exc:  # noqa: BLE001
        _one_line(exc, f'{path}: ')
        message = str(exc)
        if '/obs/' in message or '/actions' in message:
            assert 'demo_' in message, message
        single = [c for c in changes if c[0] == 'value']
        if len(changes) == 1 and single and keys is None and 'non-finite' in message:
            _, demo, key, _, _ = single[0]
            assert f'{demo[5:]}/{key}' in message, message
        return
    finally:
        path.unlink()
    VALID['hdf5 dataset'] += 1
    assert data.demos and data.obs_dim == sum(n for _, n in data.obs_fields) > 0
    for demo in data.demos:
        assert len(demo) >= 1 and demo.obs.shape == (len(demo), data.obs_dim)
        assert demo.actions.shape == (len(demo), data.action_dim) and data.action_dim > 0
        for arr in (demo.obs, demo.actions):
            assert arr.dtype == np.float32 and np.isfinite(arr).all()
            assert np.abs(arr).max() <= MAX_ABS_VALUE
    indices = range(len(data.demos))
    assert set(data.train_idx) <= set(indices) and set(data.valid_idx) <= set(indices)


def test_a_single_bad_value_names_its_demo_and_key(tmp_path):
    """The targeted form of the property above, for every key and bad value."""
    lengths, width = [4, 5, 6], {'actions': 2, 'obs/a': 2, 'obs/b': 1}
    for (index, key), value in itertools.product(itertools.product(range(3), ARRAYS),
                                                 BAD_VALUES):
        path = tmp_path / 'd.hdf5'
        with h5py.File(path, 'w') as f:
            _write_base(f, lengths)
            _apply(f, ('value', f'data/demo_{index}', key, value, 7))
        flat = 7 % (lengths[index] * width[key])
        at = f'at step {flat // width[key]}, entry {flat % width[key]}'
        with pytest.raises(UserError, match=f'demo_{index}/{key}: .*{at}'):
            load_dataset(path)
