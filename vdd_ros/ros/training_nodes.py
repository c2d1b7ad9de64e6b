"""teacher_training_node and distillation_node: the training jobs of vdd_ros.core.jobs as nodes.

Both run the job (the same function `vdd-ros train-teacher` / `vdd-ros distill` call) in a
worker thread, so the executor stays free for the `~/stop` service and the progress timer.

- `~/progress` (std_msgs/Float64MultiArray, labelled: iteration, total, loss, elapsed_s, eta_s,
  then the job's metrics) and a status on /diagnostics, every `progress_period_s`;
- `~/checkpoint` (std_msgs/String, transient local): the final checkpoint folder, once saved;
- `~/stop` (std_srvs/Trigger): ends training at the next iteration; the job still saves.

The job writes its checkpoint every `checkpoint_every` iterations and at the end. With
`exit_on_finish` the node exits when the job ends: status 0 once a checkpoint is saved
(also after ~/stop or a signal), 1 when training failed, so a launch file can chain stages.

Data-parallel: with `nproc` N > 1 the worker thread starts `torchrun --standalone
--nproc-per-node N` as a subprocess (vdd_ros.core.launch); rank 0 sends the progress the node
publishes, ~/stop ends all ranks after the iteration (rank 0 saves), and `resume` continues a
stopped or killed run from `<out>.state`. For several machines, run `torchrun --nnodes ...
-m vdd_ros.cli train-teacher` (or distill) next to the node instead (see the README).
"""
from __future__ import annotations

import math
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from vdd_ros.commands.train_teacher import parse_overrides
from vdd_ros.core.progress import Progress
from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import progress_to_msg
from vdd_ros.ros.entry import exit_now
from vdd_ros.ros.runtime import VddNode, run_node

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
PROGRESS_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LOG_EVERY_S = 10.0


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class TrainingNode(VddNode):
    """Runs one training job in a worker thread and reports on it; see the module docstring."""

    stage = ''

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.dataset = self.param('dataset', '', 'demonstration dataset (HDF5)', read_only=True)
        self.config = self.param('config', '', 'training config YAML (empty: the defaults)',
                                 read_only=True)
        self.out = self.param('out', '', 'checkpoint folder to write', read_only=True)
        self.device = self.param('device', 'cpu', 'torch device', read_only=True)
        items = self.param('overrides', 'str[]', 'config overrides KEY=VALUE, e.g. '
                           'teacher.iterations=200', read_only=True)
        self.checkpoint_every = int(self.param('checkpoint_every', 1000, 'write the '
                                               'checkpoint every this many iterations',
                                               read_only=True))
        period = self.number('progress_period_s', self.param(
            'progress_period_s', 0.5, 'seconds between two progress messages (<= 1)',
            read_only=True, dynamic=True))
        self.exit_on_finish = bool(self.param('exit_on_finish', True, 'exit when training '
                                              'ends (0: checkpoint saved, 1: failed)',
                                              read_only=True))
        self.stop_timeout_s = self.number('stop_timeout_s', self.param(
            'stop_timeout_s', 120.0, 'on shutdown, seconds to wait for the final save',
            read_only=True, dynamic=True))
        threads = int(self.param('torch_threads', 1, 'torch CPU threads (0: torch default)',
                                 read_only=True))
        self.nproc = int(self.param('nproc', 1, 'training processes: above 1, torchrun runs '
                                    'the job data-parallel on this many local ranks',
                                    read_only=True))
        self.resume = bool(self.param('resume', False, 'continue from the training state in '
                                      '<out>.state (saved with each checkpoint and on stop)',
                                      read_only=True))
        self.threads = threads
        self.declare_stage_parameters()
        if not self.dataset:
            raise UserError('parameter dataset: required')
        if not self.out:
            raise UserError('parameter out: required (the checkpoint folder to write)')
        if self.nproc < 1:
            raise UserError(f'parameter nproc: must be >= 1, got {self.nproc}')
        self.overrides = parse_overrides(items)
        if threads > 0:
            import torch
            torch.set_num_threads(threads)

        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self.state = 'starting'
        self.error = ''
        self.checkpoint = ''
        self._job_done = threading.Event()
        self._announced = False
        self._last_log = -math.inf

        self.progress_pub = self.create_publisher(Float64MultiArray, '~/progress',
                                                  PROGRESS_QOS)
        self.checkpoint_pub = self.create_publisher(String, '~/checkpoint', LATCHED)
        self.create_service(Trigger, '~/stop', self._on_stop)
        self.create_steady_timer(min(period, 1.0), self._on_timer)
        self.thread = threading.Thread(target=self._work, name=f'{self.stage}-training',
                                       daemon=True)
        self.thread.start()
        self.get_logger().info(f'{self.stage}: training on {self.dataset} -> {self.out}')

    # -- stage specifics ----------------------------------------------------------------------
    def declare_stage_parameters(self) -> None:
        """Declare the parameters only this stage has (override)."""

    def run_job(self) -> Path:
        """Run the training job with this node's progress callback and stop event."""
        raise NotImplementedError

    def job_kwargs(self) -> dict[str, Any]:
        return dict(config=self.config or None, overrides=self.overrides, device=self.device,
                    progress=self._on_progress, stop=self.stop_event, show_bar=False,
                    checkpoint_every=self.checkpoint_every, resume=self.resume)

    def run_training(self, method: str, teacher: str | None = None) -> Path:
        """The job of `method`, in this process or (nproc > 1) on torchrun ranks."""
        from vdd_ros.core.launch import run_training, torchrun_job
        if self.nproc == 1:
            return run_training(method, self.dataset, self.out, teacher=teacher,
                                **self.job_kwargs())
        return torchrun_job(method, self.dataset, self.out, self.nproc, teacher=teacher,
                            threads=self.threads, log=self.get_logger().info,
                            **self.job_kwargs())

    # -- worker thread ------------------------------------------------------------------------
    def _on_progress(self, progress: Progress) -> None:
        with self._lock:
            self._progress = progress
            if self.state == 'starting':
                self.state = 'training'

    def _work(self) -> None:
        try:
            path = self.run_job()
            self.checkpoint = str(path)
            self.state = 'stopped' if self.stop_event.is_set() else 'finished'
        except UserError as exc:
            self.state, self.error = 'failed', str(exc)
        except Exception as exc:  # a divergence or a bug: report it, never exit silently
            self.state, self.error = 'failed', f'{type(exc).__name__}: {exc}'
            self.get_logger().error(traceback.format_exc())
        finally:
            self._job_done.set()

    # -- executor callbacks -------------------------------------------------------------------
    def _on_stop(self, request: Trigger.Request, response: Trigger.Response
                 ) -> Trigger.Response:
        if self._job_done.is_set():
            response.success = False
            response.message = f'training already ended ({self.state})'
            return response
        self.stop_event.set()
        self.state = 'stopping'
        response.success = True
        response.message = 'stopping at the next iteration; the checkpoint will be saved'
        self.get_logger().info('stop requested: ending training and saving')
        return response

    def _on_timer(self) -> None:
        self._publish_progress()
        if self._job_done.is_set() and not self._announced:
            self._announced = True
            if self.state == 'failed':
                self.get_logger().error(f'{self.stage}: training failed: {self.error}')
            else:
                self.checkpoint_pub.publish(String(data=self.checkpoint))
                self.get_logger().info(f'{self.stage}: {self.state}, checkpoint '
                                       f'{self.checkpoint}')
            if self.exit_on_finish:
                self.finish(1 if self.state == 'failed' else 0)

    def _publish_progress(self) -> None:
        with self._lock:
            p = self._progress
        if p is not None:
            self.progress_pub.publish(progress_to_msg(p.stage, p.iteration, p.total, p.loss,
                                                      p.elapsed_s, p.eta_s, p.metrics))
        values: dict[str, Any] = {'state': self.state, 'dataset': self.dataset,
                                  'out': self.out, 'checkpoint': self.checkpoint}
        if p is not None:
            values.update(iteration=p.iteration, total=p.total, loss=p.loss,
                          elapsed_s=p.elapsed_s, eta_s=p.eta_s)
            values.update(p.metrics)
        if self.state == 'failed':
            level, message = 'ERROR', f'failed: {self.error}'
        elif p is None:
            level, message = 'OK', f'{self.state}: loading data'
        else:
            level = 'OK'
            message = (f'{self.state}: {p.iteration}/{p.total}, loss {p.loss:.4g}, '
                       f'ETA {format_duration(p.eta_s)}')
            if self.steady.now().nanoseconds / 1e9 - self._last_log >= LOG_EVERY_S:
                self._last_log = self.steady.now().nanoseconds / 1e9
                self.get_logger().info(f'{self.stage} {message}')
        self.publish_diagnostics(level, message, values)

    def shutdown(self) -> None:
        if self.thread.is_alive():
            self.stop_event.set()
            self.get_logger().info('shutting down: waiting for the final checkpoint')
            self.thread.join(self.stop_timeout_s)
            if self.thread.is_alive():
                self.get_logger().error('training did not stop in time; no final checkpoint')
        if self._job_done.is_set() and not self._announced:
            self._on_timer()  # announce the checkpoint (or the failure) before leaving


class TeacherTrainingNode(TrainingNode):
    """Trains the diffusion teacher on a demonstration dataset."""

    stage = 'teacher'

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('teacher_training_node', **kwargs)

    def run_job(self) -> Path:
        return self.run_training('teacher')


class DistillationNode(TrainingNode):
    """Distils a teacher checkpoint into a VDD Mixture of Experts."""

    stage = 'vdd'

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('distillation_node', **kwargs)

    def declare_stage_parameters(self) -> None:
        self.teacher = self.param('teacher', '', 'teacher checkpoint folder', read_only=True)
        if not self.teacher:
            raise UserError('parameter teacher: required (a teacher checkpoint folder)')

    def run_job(self) -> Path:
        return self.run_training('vdd_moe', self.teacher)


def teacher_main(args: list[str] | None = None) -> NoReturn:
    """The teacher_training_node executable: run the node, then exit with its status."""
    exit_now(run_node(TeacherTrainingNode, args, 'teacher_training_node'))


def distillation_main(args: list[str] | None = None) -> NoReturn:
    """The distillation_node executable: run the node, then exit with its status."""
    exit_now(run_node(DistillationNode, args, 'distillation_node'))

