"""Keeps `make run`'s services (and its private Redis) running as a process supervisor does: one that exits is
started again on its old ports, after a backoff that doubles with each crash in a row (and resets once it has run
for a while); every restart is logged and counted. Only Ctrl-C stops the mesh."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from demo.mesh import LocalMesh
from demo.processes import ServiceProcess
from demo.redis_server import RedisServer


@dataclass
class _Crashes:
    in_a_row: int = 0
    restart_at: float = 0.0  # monotonic; 0: not waiting to restart
    started_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        mesh: LocalMesh,
        say: Callable[[str], None] = print,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mesh = mesh
        self._say = say
        self._initial = backoff_initial_s
        self._max = backoff_max_s
        self._stable_after = stable_after_s
        self._clock = clock
        self._crashes: dict[str, _Crashes] = {}
        self.restarts: dict[str, int] = {}  # service name → restarts so far

    def check(self) -> None:
        """Look at every service once: schedule a restart for one that exited, do the restarts that are due."""
        now = self._clock()
        for process in self.mesh.supervised():
            crashes = self._crashes.setdefault(process.name, _Crashes(started_at=now))
            if process.alive:
                if crashes.in_a_row and now - crashes.started_at > self._stable_after:
                    crashes.in_a_row = 0  # it has run a while: the next crash starts from the first backoff
                continue
            if not crashes.restart_at:
                crashes.in_a_row += 1
                delay = min(self._max, self._initial * 2 ** (crashes.in_a_row - 1))
                crashes.restart_at = now + delay
                code = process.process.returncode if process.process is not None else None
                self._say(
                    f"{process.name} exited ({code}); restarting in {delay:g} s (crash {crashes.in_a_row} in a row)"
                )
            elif now >= crashes.restart_at:
                self._restart(process, crashes)

    def _restart(self, process: ServiceProcess | RedisServer, crashes: _Crashes) -> None:
        crashes.restart_at = 0.0
        try:
            self.mesh.restart(process)
        except (RuntimeError, TimeoutError, OSError) as error:
            self._say(f"{process.name} did not start again: {str(error).splitlines()[0]}")
            return  # still not alive: the next check schedules the next try, with a longer backoff
        crashes.started_at = self._clock()
        self.restarts[process.name] = self.restarts.get(process.name, 0) + 1
        self._say(f"{process.name} restarted (restart {self.restarts[process.name]})")
