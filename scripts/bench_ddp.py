"""Training throughput without a process group, and under torchrun on 1 and N ranks, in one run.

    python scripts/bench_ddp.py [--nproc 2] [--device cpu] [--teacher-iterations 40]

Each setting runs the teacher loop and the VDD loop (with the teacher's score) at the default
model sizes on synthetic data, one torch thread per process, and reports global samples per
second over the timed iterations (after a warm-up; process start-up is not counted). On a
machine shared with other work the figures move with its load: compare them within one run.
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

        def timed(run, warmup: int) -> float:
            run(warmup)
            dp.barrier()
            if dp.device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(None)
            if dp.device.type == 'cuda':
                torch.cuda.synchronize()
            dp.barrier()
            return time.perf_counter() - start

        t_s = timed(lambda n: train_teacher(teacher, obs, act, iterations=n or
                                            args.teacher_iterations, show_bar=False, dp=dp), 5)

        def run_vdd(n):
            cfg = vcfg if n is None else VDDConfig(iterations=n)
            distill(moe, score, obs, act, cfg, show_bar=False, dp=dp)
        v_s = timed(run_vdd, 2)
        if dp.is_main:
            print('RESULT ' + json.dumps({
                'ranks': dp.world, 'process_group': dp.active,
                'teacher_samples_s': args.teacher_iterations * tcfg.batch_size / t_s,
                'teacher_iter_s': args.teacher_iterations / t_s,
                'vdd_states_s': args.vdd_iterations * vcfg.batch_size * vcfg.expert_steps / v_s,
                'vdd_iter_s': args.vdd_iterations / v_s}), flush=True)


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
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    settings = [('no process group, 1 thread', None, 1), ('torchrun, 1 rank', 1, 1),
                (f'torchrun, {args.nproc} ranks', args.nproc, 1),
                (f'no process group, {args.nproc} threads', None, args.nproc)]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    for _ in range(args.repeats):
        for name, nproc, threads in settings:
            rows[name].append(launch(args, nproc, threads))
    print(f'{"setting":34s} {"teacher samples/s":>18s} {"VDD states/s":>13s}')
    for name, results in rows.items():
        t = sorted(r['teacher_samples_s'] for r in results)
        v = sorted(r['vdd_states_s'] for r in results)
        print(f'{name:34s} {t[len(t) // 2]:18.0f} {v[len(v) // 2]:13.0f}'
              + (f'   (runs: {", ".join(f"{x:.0f}" for x in t)} / '
                 f'{", ".join(f"{x:.0f}" for x in v)})' if len(results) > 1 else ''))


if __name__ == '__main__':
    main()
