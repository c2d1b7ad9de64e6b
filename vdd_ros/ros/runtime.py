"""What every vdd_ros node shares: parameter declaration, diagnostics, and the run loop.

`run_node` gives each executable the same life cycle: init rclpy with the command line, build
the node (a UserError from bad parameters is logged as FATAL, exit status 2), spin until the node
says it is finished or a signal arrives (one SIGINT or SIGTERM is a clean stop, exit status 0),
then ignore further signals while the node shuts down (with its context still valid), so a
second signal never crashes it.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterUninitializedException)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import diagnostic_array, diagnostic_status

DIAGNOSTICS_TOPIC = '/diagnostics'
_ARRAY_TYPES = {
    'int[]': Parameter.Type.INTEGER_ARRAY, 'float[]': Parameter.Type.DOUBLE_ARRAY,
    'str[]': Parameter.Type.STRING_ARRAY,
}


class VddNode(Node):
    """Base of the vdd_ros nodes: described parameters, diagnostics, a steady clock.

    A node that ends by itself sets `finished` and `exit_code`; `shutdown()` releases what the
    node owns (threads, environments) and runs once, with signals ignored.
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.finished = threading.Event()
        self.exit_code = 0
        self.steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)

    # -- parameters ---------------------------------------------------------------------------
    def param(self, name: str, default: Any, description: str, *, read_only: bool = False,
              dynamic: bool = False, constraints: str = '') -> Any:
        """Declare a parameter with a description and return its value.

        `default` may be a value or an array type name ('int[]', 'float[]', 'str[]'): such a
        parameter is declared with that type and, unless it is set, an empty list of that type
        as its value; it reads as a list. `dynamic` allows any type (for numbers given as `20`
        or `20.0`, or a mode given as `sample` or `2`). Every parameter thus has a value, so the
        parameter services (`ros2 param dump`, `param get`) list each one.
        """
        desc = ParameterDescriptor(description=description, read_only=read_only,
                                   dynamic_typing=dynamic, additional_constraints=constraints)
        try:
            if isinstance(default, str) and default in _ARRAY_TYPES:
                return self._declare_array(name, _ARRAY_TYPES[default], desc)
            return self.declare_parameter(name, default, desc).value
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise UserError(f'parameter {name}: {exc}') from None

    def _declare_array(self, name: str, kind: Parameter.Type,
                       desc: ParameterDescriptor) -> list[Any]:
        """Declare an array parameter of type `kind` whose value, when unset, is a typed [].

        rclpy reads an empty list as a byte array, and a parameter declared by type alone has
        no value (rclpy 9.1's parameter services then answer a whole request with an empty
        list). So the parameter is declared by type, writable, given a typed empty value when
        nothing set it, and made read-only only then.
        """
        writable = ParameterDescriptor(description=desc.description,
                                       additional_constraints=desc.additional_constraints)
        self.declare_parameter(name, kind, writable)
        try:
            value = self.get_parameter(name).value
        except ParameterUninitializedException:
            result = self.set_parameters([Parameter(name, kind, [])])[0]
            if not result.successful:
                raise UserError(f'parameter {name}: {result.reason}') from None
            value = []
        if desc.read_only:
            desc.type = kind.value
            self.set_descriptor(name, desc)
        return list(value) if value is not None else []

    def number(self, name: str, value: Any, low: float = 0.0, inclusive: bool = False,
               high: float = math.inf, note: str = '') -> float:
        """`value` as a float above `low` (or at least `low`) and at most `high`; UserError
        naming the parameter and the range (and `note`, e.g. where a bound comes from)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f'parameter {name}: expected a number, got {value!r}')
        value = float(value)
        ok = value >= low if inclusive else value > low
        if not ok or not value <= high or not math.isfinite(value):
            limit = f'{">=" if inclusive else ">"} {low:g}'
            if high < math.inf:
                limit += f' and <= {high:g}'
            raise UserError(f'parameter {name}: must be {limit}{f" ({note})" if note else ""},'
                            f' got {value:g}')
        return value

    # -- diagnostics --------------------------------------------------------------------------
    def publish_diagnostics(self, level: str, message: str, values: dict[str, Any],
                            name: str | None = None) -> None:
        """One status on /diagnostics, named after this node's full name."""
        status = diagnostic_status(name or self.get_fully_qualified_name().lstrip('/'), level,
                                   message, values,
                                   hardware_id=self.get_fully_qualified_name())
        self._diag_pub.publish(diagnostic_array([status], self.get_clock().now().to_msg()))

    def create_steady_timer(self, period_s: float, callback: Callable[[], None]) -> Any:
        """A timer on the steady clock (immune to system-time jumps)."""
        return self.create_timer(period_s, callback, clock=self.steady)

    def finish(self, code: int = 0) -> None:
        """Ask the run loop to end with exit status `code`."""
        self.exit_code = code
        self.finished.set()

    def shutdown(self) -> None:
        """Release what the node owns (override)."""


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass


def spin(node: VddNode, executor: Any, timeout_s: float | None = None,
         until: Callable[[], bool] | None = None) -> bool:
    """Spin `executor` until `node.finished`, `until()`, the timeout or shutdown.

    Returns True when it ended for `finished` or `until`, False on timeout or shutdown.
    """
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while node.context.ok():
        if node.finished.is_set() or (until is not None and until()):
            return True
        if end is not None and time.monotonic() >= end:
            return False
        try:
            executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            raise
        except Exception:
            if node.context.ok():
                raise
            break  # a callback raced with a signal's shutdown (publisher context invalid)
    return False


def make_executor(context: Any) -> Any:
    """An executor for `context`: rclpy's EventsExecutor where rclpy has it, else the
    SingleThreadedExecutor (or that one when VDD_ROS_EXECUTOR=single).

    The events executor dispatches from C++: at 500 Hz under CPU contention it kept the policy
    node's deadline-miss rate near 2% where the single-threaded one missed about 20%.
    """
    if os.environ.get('VDD_ROS_EXECUTOR', 'events') != 'single':
        try:
            from rclpy.experimental.events_executor import EventsExecutor
        except ImportError:  # rclpy before Jazzy
            pass
        else:
            return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


def run_node(factory: Callable[[], VddNode], args: list[str] | None = None,
             name: str = 'vdd_ros') -> int:
    """Init rclpy with `args`, build the node, spin it, shut down cleanly; the exit status.

    SIGINT and SIGTERM are handled here rather than by rclpy, so that `node.shutdown()` runs
    while the context is still valid (it may log and publish, e.g. a final checkpoint path).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    rclpy.init(args=sys.argv if args is None else args,
               signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    node: VddNode | None = None
    code = 0
    try:
        node = factory()
        executor = make_executor(node.context)
        executor.add_node(node)
        spin(node, executor, until=stop.is_set)
        code = node.exit_code if node.finished.is_set() and not stop.is_set() else 0
    except (KeyboardInterrupt, ExternalShutdownException):
        code = 0
    except UserError as exc:
        rclpy.logging.get_logger(name).fatal(str(exc))
        code = 2
    finally:
        _ignore_signals()
        if node is not None:
            try:
                node.shutdown()
            finally:
                node.destroy_node()
        rclpy.try_shutdown()
    return code  # signals stay ignored: the process is about to exit
