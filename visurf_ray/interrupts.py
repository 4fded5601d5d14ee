"""Ending a command cleanly on SIGINT (Ctrl-C) or SIGTERM: the first signal is handed on as a stop request, a second
one ends the command at once.

While a Tune run is in progress (`Interrupts.tuning`) the stop request goes to Tune as SIGUSR1, Tune's own
"interrupt" signal: it stops the trials (each closes its metric sinks) and saves the experiment state, and `fit()`
returns. Elsewhere it is raised as KeyboardInterrupt, so the loop's `finally` closes its sinks and the last
checkpoint stays as it is. SIGTERM thus behaves like Ctrl-C, where Python and Tune would otherwise die on it
without cleaning up. Never imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_NOTICES = ("Stop signal received", "Experiment has been interrupted")
"""Tune's own interrupt messages: replaced by this module's line (they tell a user to call `Tuner.restore`, where
re-running the command is what resumes)."""


class _DropTuneNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TUNE_NOTICES)


class Interrupts:
    """Catches SIGINT and SIGTERM inside `with Interrupts(): ...` (main thread only). `received` is the first
    signal's number (None until one arrives); `exit_code` the conventional 128 + that number."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._on_stop: Callable[[], None] | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self) -> Interrupts:
        # Tune replaces the SIGINT handler during fit() unless told not to; SIGUSR1 is always its own
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        logging.getLogger("ray.tune.tune").addFilter(_DropTuneNotices())
        self._previous = {number: signal.getsignal(number) for number in SIGNALS}
        self._install()
        return self

    def _install(self) -> None:
        for number in SIGNALS:
            signal.signal(number, self._handle)

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @contextlib.contextmanager
    def tuning(self, on_stop: Callable[[], None]) -> Iterator[None]:
        """Hand a stop request to Tune while the block runs (a `Tuner.fit()`), calling `on_stop()` in a thread of its
        own as well (what Tune cannot do: tell the running trials at once). Takes the handlers back first:
        `ray.init` installs its own SIGTERM handler (exit at once)."""
        self._install()
        self._on_stop = on_stop
        try:
            yield
        finally:
            self._on_stop = None

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopping at once")
        self.received = number
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self._on_stop is not None and tune_listens:
            threading.Thread(target=self._on_stop, name="visurf-on-stop", daemon=True).start()
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise KeyboardInterrupt(self.name)
