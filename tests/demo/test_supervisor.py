"""The supervisor of `make run`: a crashed service is restarted after a doubling backoff, counted and logged
(pure logic: a stand-in mesh and clock)."""

from __future__ import annotations

from typing import Any

from demo.supervisor import Supervisor


class Process:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.process: Any = None


class Mesh:
    def __init__(self, *names: str) -> None:
        self.services = {name: Process(name) for name in names}
        self.refuse = 0  # restarts that fail before one works
        self.restarted: list[str] = []

    def supervised(self) -> list[Process]:
        return list(self.services.values())

    def restart(self, old: Process) -> Process:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("model_service_0 exited with 1\nlog tail")
        self.restarted.append(old.name)
        new = self.services[old.name] = Process(old.name)
        return new


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_crashed_service_is_restarted_after_a_doubling_backoff_and_counted() -> None:
    mesh, clock, said = Mesh("router", "model_service_0"), Clock(), []
    supervisor = Supervisor(mesh, said.append, backoff_initial_s=0.5, backoff_max_s=4, stable_after_s=60, clock=clock)  # type: ignore[arg-type]
    supervisor.check()
    mesh.services["model_service_0"].alive = False
    supervisor.check()
    assert mesh.restarted == [] and "restarting in 0.5 s" in said[-1]
    clock.now += 0.5
    supervisor.check()
    assert mesh.restarted == ["model_service_0"] and supervisor.restarts == {"model_service_0": 1}
    assert said[-1] == "model_service_0 restarted (restart 1)"
    # It crashes again at once, and its restarts fail twice: 1 s, then 2 s, then 4 s (the maximum) apart.
    mesh.services["model_service_0"].alive = False
    mesh.refuse = 2
    delays = []
    for _ in range(3):
        supervisor.check()
        delays.append(float(said[-1].split("restarting in ")[1].split(" s")[0]))
        clock.now += delays[-1]
        supervisor.check()
    assert delays == [1.0, 2.0, 4.0]
    assert mesh.restarted == ["model_service_0", "model_service_0"] and mesh.services["router"].alive
    assert any("did not start again: model_service_0 exited with 1" in line for line in said)


def test_the_backoff_starts_over_once_a_service_has_run_a_while() -> None:
    mesh, clock, said = Mesh("gateway"), Clock(), []
    supervisor = Supervisor(mesh, said.append, backoff_initial_s=0.5, stable_after_s=60, clock=clock)  # type: ignore[arg-type]
    for _ in range(2):  # two crashes in a row: 0.5 s, then 1 s
        mesh.services["gateway"].alive = False
        supervisor.check()
        clock.now += 1
        supervisor.check()
    assert "restarting in 1 s" in said[-2]
    clock.now += 61
    supervisor.check()  # ran a minute: stable
    mesh.services["gateway"].alive = False
    supervisor.check()
    assert "restarting in 0.5 s (crash 1 in a row)" in said[-1]
