"""Data-parallel training under torchrun: two gloo ranks on the CPU end with identical
parameters and match a run without a process group; NCCL where CUDA is available."""
import socket

import pytest
import torch
from safetensors.torch import load_file

import ddpkit
from ddpkit import TOLERANCE, close_to, torchrun
from vdd_ros.core.distributed import DataParallel, data_parallel, resolve_device
from vdd_ros.errors import UserError

KIT = str(ddpkit.ROOT / 'test' / 'ddpkit.py')


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ddp')
    done = torchrun(2, KIT, str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(str(folder / f'rank{r}.safetensors')) for r in (0, 1)]


@pytest.fixture(scope='module')
def one_process():
    return ddpkit.train_all()


def test_two_gloo_ranks_hold_identical_parameters_after_every_loop(two_ranks):
    first, second = two_ranks
    assert int(first['world']) == int(second['world']) == 2
    assert not bool(first['backend_is_nccl'])
    # every rank finds that the ranks read different data
    assert bool(first['mismatch_caught']) and bool(second['mismatch_caught'])
    compared = [k for k in first if k not in ('rows', 'world', 'backend_is_nccl',
                                              'mismatch_caught')]
    assert {k.split('.')[0] for k in compared} == {'teacher', 'vdd', 'bc', 'curve'}
    for key in compared:
        assert torch.equal(first[key], second[key]), key
    # each rank took its own rows of the global batch of 33: disjoint, together all of them
    assert (len(first['rows']), len(second['rows'])) == (16, 17)
    assert torch.equal(torch.cat([first['rows'], second['rows']]), torch.arange(33))


def test_two_ranks_match_one_process_with_the_same_global_batch_and_seed(two_ranks,
                                                                         one_process):
    ranked = two_ranks[0]
    assert set(one_process) <= set(ranked)
    worst = max(close_to(ranked[k], v) for k, v in one_process.items())
    assert worst < TOLERANCE
    # the tolerance separates: the same training with another seed lands far outside it
    other = ddpkit.train_all(seed=1)
    assert max(close_to(other[k], v) for k, v in one_process.items()) > 100 * TOLERANCE
    for name in ('teacher', 'warm', 'vdd', 'bc'):
        assert len(ranked[f'curve.{name}']) == len(one_process[f'curve.{name}'])


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with data_parallel('cpu') as dp:
        assert not dp.active and dp.world == 1 and dp.is_main
        assert not torch.distributed.is_initialized()
        assert dp.rows(7) == slice(0, 7) and dp.share(7) == 1.0
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        assert dp.sync([p], 0.5, [torch.tensor(1.5)], stop=True) == [1.5]
        assert torch.equal(p.grad, torch.full((3,), 2.0))
        assert not dp.should_stop(False) and dp.should_stop(True)


def test_shares_of_a_global_batch_are_disjoint_and_cover_it():
    for world in (1, 2, 3, 5):
        ranks = [DataParallel(rank=r, world=world) for r in range(world)]
        rows = [list(range(17))[dp.rows(17)] for dp in ranks]
        assert sum(rows, []) == list(range(17))
        assert sum(dp.share(17) for dp in ranks) == pytest.approx(1.0)
    with pytest.raises(UserError, match='batch of 2 rows cannot be shared by 3 ranks'):
        DataParallel(rank=0, world=3).check_batch(2, 'teacher')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on a machine '
                    'without CUDA')
def test_a_cuda_device_without_cuda_is_one_line():
    with pytest.raises(UserError, match='device cuda: CUDA is not available'):
        resolve_device('cuda')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='NCCL needs CUDA, and no CUDA '
                    'device is available')
def test_nccl_ranks_on_cuda_match_one_process(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    done = torchrun(nproc, KIT, str(tmp_path), 'cuda')
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f'rank{r}.safetensors')) for r in range(nproc)]
    assert all(bool(r['backend_is_nccl']) for r in ranks)
    with data_parallel('cuda') as dp:
        single = ddpkit.train_all(dp)
    for key, value in single.items():
        assert all(torch.equal(r[key], ranks[0][key]) for r in ranks), key
    assert max(close_to(ranks[0][k], v) for k, v in single.items()) < 1e-4


def test_a_one_rank_process_group_passes_gradients_through_and_votes(monkeypatch):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for key, value in dict(WORLD_SIZE='1', RANK='0', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(port), GLOO_SOCKET_IFNAME='lo').items():
        monkeypatch.setenv(key, value)
    with data_parallel('cpu') as dp:
        assert dp.active and dp.world == 1 and torch.distributed.get_backend() == 'gloo'
        p = torch.nn.Parameter(torch.ones(2, 2))
        p.grad = torch.full((2, 2), 4.0)
        grad = p.grad
        assert dp.sync([p], 1.0, [torch.tensor(2.0), 6.0], stop=True) == [2.0, 6.0]
        assert p.grad is grad and dp.should_stop(False)
        dp.sync([p], 1.0, [], stop=False)
        assert not dp.should_stop(True)          # the vote of the last sync, not the flag
    assert not torch.distributed.is_initialized()
