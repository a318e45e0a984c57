"""A test handler that SIGKILLs its own process once, as a crash would: ``KillOnce`` fires at the
first completed iteration with the given iteration number or in the given epoch, unless its marker
file exists (it writes the marker first, so that the rerun of the same command is not killed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ignite.engine import Engine, Events


class KillOnce:
    def __init__(self, marker: str, iteration: int = -1, epoch: int = -1) -> None:
        self.marker = Path(marker)
        self.iteration, self.epoch = iteration, epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == self.iteration or engine.state.epoch == self.epoch:
            if not self.marker.exists():
                self.marker.write_text(str(engine.state.iteration))
                os.kill(os.getpid(), signal.SIGKILL)
