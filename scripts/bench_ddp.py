"""Training throughput without a process group, and under torchrun on 1 and N ranks, in one run.

    python scripts/bench_ddp.py [--nproc 2] [--device cpu] [--teacher-iterations 40]
    python scripts/bench_ddp.py --overhead [--repeats 10]

Each setting runs the teacher loop and the VDD loop (with the teacher's score) at the default
model sizes on synthetic data, one torch thread per process, and reports global samples per
second over the timed iterations (after a warm-up; process start-up is not counted). On a
machine shared with other work the figures move with its load: compare them within one run.
"in all-reduce" is the share of the loop's time spent in DataParallel.sync (the whole
data-parallel cost per step, waiting for the slowest rank included; none at one rank, where
there is nothing to reduce); "CPU ms / 1000 samples" adds up the CPU time of all ranks, which
the machine's load disturbs far less than wall time.
`--overhead` times the same loops in one process, alternately without a process group and with
a one-rank gloo group, and prints the median ratio, little disturbed by the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBS_DIM, ACTION_DIM, OBS_HORIZON, ACTION_HORIZON, STATES = 20, 7, 2, 8, 4096


def worker(args: argparse.Namespace) -> None:
    """Time both loops in this process (one rank under torchrun); rank 0 prints JSON."""
    import torch

    from vdd_ros.core.config import MoEConfig, TeacherConfig, VDDConfig
    from vdd_ros.core.distributed import data_parallel
    from vdd_ros.core.moe import MixtureOfExperts
    from vdd_ros.core.scores import TeacherScore
    from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
    from vdd_ros.core.vdd import distill
    torch.set_num_threads(args.threads)
    with data_parallel(args.device) as dp:
        gen = torch.Generator().manual_seed(0)
        obs = torch.randn(STATES, OBS_DIM * OBS_HORIZON, generator=gen).to(dp.device)
        act = (torch.rand(STATES, ACTION_DIM * ACTION_HORIZON, generator=gen) * 2 - 1
               ).to(dp.device)
        torch.manual_seed(0)
        tcfg = TeacherConfig()
        teacher = DiffusionTeacher(tcfg, OBS_DIM, ACTION_DIM, OBS_HORIZON, ACTION_HORIZON
                                   ).to(dp.device)
        vcfg = VDDConfig(iterations=args.vdd_iterations)
        moe = MixtureOfExperts(MoEConfig(), OBS_DIM, ACTION_DIM, OBS_HORIZON, ACTION_HORIZON
                               ).to(dp.device)
        score = TeacherScore(DiffusionTeacher(tcfg, OBS_DIM, ACTION_DIM, OBS_HORIZON,
                                              ACTION_HORIZON).to(dp.device))

        spent = [0.0]
        plain_sync = dp.sync

        def sync(*a, **k):        # time spent in the all-reduce step (data-parallel cost)
            start = time.perf_counter()
            try:
                return plain_sync(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start
        dp.sync = sync

        cpu = [0.0]

        def timed(run, warmup: int) -> float:
            run(warmup)
            dp.barrier()
            spent[0] = 0.0
            if dp.device.type == 'cuda':
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            run(None)
            if dp.device.type == 'cuda':
                torch.cuda.synchronize()
            used = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
            if dp.active and dp.world > 1:       # CPU seconds of all ranks together
                used = used.to(dp.device)
                torch.distributed.all_reduce(used)
            cpu[0] = float(used)
            dp.barrier()
            return time.perf_counter() - start

        t_s = timed(lambda n: train_teacher(teacher, obs, act, iterations=n or
                                            args.teacher_iterations, show_bar=False, dp=dp), 5)
        t_sync, t_cpu = spent[0], cpu[0]

        def run_vdd(n):
            cfg = vcfg if n is None else VDDConfig(iterations=n)
            distill(moe, score, obs, act, cfg, show_bar=False, dp=dp)
        v_s = timed(run_vdd, 2)
        v_sync, v_cpu = spent[0], cpu[0]
        if dp.is_main:
            print('RESULT ' + json.dumps({
                'ranks': dp.world, 'process_group': dp.active,
                'teacher_samples_s': args.teacher_iterations * tcfg.batch_size / t_s,
                'teacher_iter_s': args.teacher_iterations / t_s,
                'vdd_states_s': args.vdd_iterations * vcfg.batch_size * vcfg.expert_steps / v_s,
                'vdd_iter_s': args.vdd_iterations / v_s,
                'teacher_sync_share': t_sync / t_s, 'vdd_sync_share': v_sync / v_s,
                'teacher_cpu_ms_per_1k': 1e6 * t_cpu / (args.teacher_iterations
                                                        * tcfg.batch_size),
                'vdd_cpu_ms_per_1k': 1e6 * v_cpu / (args.vdd_iterations * vcfg.batch_size
                                                    * vcfg.expert_steps)}),
                flush=True)


def overhead(args: argparse.Namespace) -> None:
    """Median time of the loops with a one-rank process group over without, alternated."""
    import socket
    import statistics

    import torch
    import torch.distributed as dist

    from vdd_ros.core.config import MoEConfig, TeacherConfig, VDDConfig
    from vdd_ros.core.distributed import DataParallel
    from vdd_ros.core.moe import MixtureOfExperts
    from vdd_ros.core.scores import TeacherScore
    from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
    from vdd_ros.core.vdd import distill
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0,
                            world_size=1)
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(STATES, OBS_DIM * OBS_HORIZON, generator=gen)
    act = torch.rand(STATES, ACTION_DIM * ACTION_HORIZON, generator=gen) * 2 - 1
    shape = (OBS_DIM, ACTION_DIM, OBS_HORIZON, ACTION_HORIZON)
    teacher = DiffusionTeacher(TeacherConfig(), *shape)
    moe = MixtureOfExperts(MoEConfig(), *shape)
    score = TeacherScore(DiffusionTeacher(TeacherConfig(), *shape))
    loops = {
        'teacher': lambda dp: train_teacher(teacher, obs, act, iterations=args.teacher_iterations,
                                            show_bar=False, dp=dp),
        'vdd': lambda dp: distill(moe, score, obs, act,
                                  VDDConfig(iterations=args.vdd_iterations), show_bar=False,
                                  dp=dp)}
    for name, loop in loops.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeats + 1):
            for active in (False, True):
                start = time.perf_counter()
                loop(DataParallel(active=active))
                if i:        # the first round warms up
                    times[active].append(time.perf_counter() - start)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f'{name}: {off * 1e3:.1f} ms without a process group, {on * 1e3:.1f} ms with a '
              f'one-rank group: overhead {100 * (on / off - 1):+.1f}%')
    dist.destroy_process_group()


def launch(args: argparse.Namespace, nproc: int | None, threads: int = 1) -> dict:
    """One setting: no torchrun (`nproc` None) or torchrun on `nproc` ranks."""
    own = [__file__, '--worker', '--device', args.device, '--threads', str(threads),
           '--teacher-iterations', str(args.teacher_iterations),
           '--vdd-iterations', str(args.vdd_iterations)]
    if nproc is None:
        cmd = [sys.executable, *own]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--local-addr',
               '127.0.0.1', '--nproc-per-node', str(nproc), *own]
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    env.update(OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith('RESULT ')]
    if done.returncode or not lines:
        sys.exit(f'{" ".join(cmd)} failed:\n{done.stderr[-3000:]}')
    return json.loads(lines[-1][len('RESULT '):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument('--teacher-iterations', type=int, default=40)
    parser.add_argument('--vdd-iterations', type=int, default=6)
    parser.add_argument('--repeats', type=int, default=1,
                        help='run the settings this many times, interleaved')
    parser.add_argument('--overhead', action='store_true',
                        help='the one-rank process group against none, in one process')
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.overhead:
        overhead(args)
        return
    settings = [('no process group, 1 thread', None, 1), ('torchrun, 1 rank', 1, 1),
                (f'torchrun, {args.nproc} ranks', args.nproc, 1),
                (f'no process group, {args.nproc} threads', None, args.nproc)]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    for _ in range(args.repeats):
        for name, nproc, threads in settings:
            rows[name].append(launch(args, nproc, threads))
    print(f'{"setting":32s} {"teacher samples/s":>17s} {"VDD states/s":>12s} '
          f'{"in all-reduce":>14s} {"CPU ms / 1000 samples":>22s}')
    for name, results in rows.items():
        keys = ('teacher_samples_s', 'vdd_states_s', 'teacher_sync_share', 'vdd_sync_share',
                'teacher_cpu_ms_per_1k', 'vdd_cpu_ms_per_1k')
        cols = [[r[k] for r in results] for k in keys]
        t, v, ts, vs, tc, vc = (sorted(x)[len(x) // 2] for x in cols)
        print(f'{name:32s} {t:17.0f} {v:12.0f} {100 * ts:6.1f}% {100 * vs:5.1f}% '
              f'{tc:11.1f} {vc:10.1f}'
              + (f'   (runs: {", ".join(f"{x:.0f}" for x in cols[0])} / '
                 f'{", ".join(f"{x:.0f}" for x in cols[1])})' if len(results) > 1 else ''))
    print('medians over the runs; teacher then VDD in each pair of columns; CPU time of all '
          'ranks together')


if __name__ == '__main__':
    main()
