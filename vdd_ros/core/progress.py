"""Progress reporting shared by every training loop (tqdm bar, callbacks, early stop)."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm


@dataclass
class Progress:
    """One progress report of a training loop."""

    stage: str
    iteration: int
    total: int
    loss: float
    elapsed_s: float
    eta_s: float
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


class DivergenceError(RuntimeError):
    """A loss or parameter became NaN or Inf."""


class ProgressTracker:
    """Drives a tqdm bar, throttled callbacks and NaN checks for one training loop.

    `stop` is an optional `threading.Event`; when set, `should_stop` turns true and the loop
    ends early (it still saves what it has). A resumed loop passes the iteration it starts at
    and the loss history so far. Pass `show_bar=False` and no callback on ranks other than 0.
    """

    def __init__(self, stage: str, total: int, callback: ProgressCallback | None = None,
                 stop: threading.Event | None = None, show_bar: bool = True,
                 every_s: float = 0.5, initial: int = 0,
                 history: list[tuple[int, float]] | None = None) -> None:
        self.stage, self.total = stage, total
        self.callback, self.stop = callback, stop
        self.every_s = every_s
        self.start = time.monotonic()
        self.initial = initial
        self._last_cb = -math.inf
        self.history: list[tuple[int, float]] = list(history or [])
        self.bar = tqdm(total=total, initial=initial, desc=stage, disable=not show_bar,
                        dynamic_ncols=True, leave=False)

    @property
    def should_stop(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def update(self, iteration: int, loss: float, **metrics: float) -> None:
        """Record iteration `iteration` (0-based); raise DivergenceError on a non-finite loss."""
        if not math.isfinite(loss):
            self.bar.close()
            raise DivergenceError(f'{self.stage}: loss became {loss} at iteration {iteration}')
        self.history.append((iteration, float(loss)))
        self.bar.update(1)
        self.bar.set_postfix(loss=f'{loss:.4g}', refresh=False)
        now = time.monotonic()
        if self.callback is not None and (now - self._last_cb >= self.every_s
                                          or iteration + 1 == self.total):
            self._last_cb = now
            self.callback(self.report(iteration, loss, metrics))

    def report(self, iteration: int, loss: float, metrics: dict[str, float]) -> Progress:
        elapsed = time.monotonic() - self.start
        done = iteration + 1
        ran = done - self.initial
        eta = elapsed / ran * (self.total - done) if ran > 0 else math.inf
        return Progress(self.stage, done, self.total, float(loss), elapsed, eta, dict(metrics))

    def close(self) -> None:
        self.bar.close()
