"""Model service replicas: least-loaded of two random choices, outlier ejection. Pure logic.

"Load" is peak-EWMA cost (as in Finagle and Linkerd): the replica's recent latency times its in-flight
calls + 1. In-flight counts alone cannot tell a slow replica from a fast one at low concurrency; the
latency term can. The latency estimate decays while a replica is not chosen, so a replica that was slow
is tried again later and its estimate refreshed.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from infermesh import metrics
from infermesh.errors import Unavailable
from infermesh.model_config import READY, UNLOADING
from infermesh.repository import RepositoryState, merge


@dataclass(eq=False)
class Replica:
    address: str
    client: Any
    inflight: int = 0
    healthy: bool = True
    ejected_until: float = 0.0
    failures: int = field(default=0)
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=OUTCOME_WINDOW))  # recent calls: ok?
    latency_s: float = 0.0  # peak-EWMA of call latency
    latency_at: float = 0.0  # when latency_s was last updated (monotonic)
    repository: RepositoryState | None = None  # the replica's models and version states, as it last said
    ready: frozenset[tuple[str, str]] = frozenset()  # (model, version) it takes requests for: READY or UNLOADING

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def serves(self, key: tuple[str, str] | None) -> bool:
        return key is None or key in self.ready

    def cost(self, now: float, decay_s: float) -> float:
        latency = self.latency_s * math.exp(-(now - self.latency_at) / decay_s) if self.latency_s else 0.0
        return latency * (self.inflight + 1)

    def observe(self, latency_s: float, now: float, decay_s: float) -> None:
        if latency_s >= self.latency_s:
            self.latency_s = latency_s  # peak: react to a slowdown at once
        else:
            weight = math.exp(-(now - self.latency_at) / decay_s)
            self.latency_s = self.latency_s * weight + latency_s * (1 - weight)
        self.latency_at = now


OUTCOME_WINDOW = 32  # calls per replica that its success rate is taken over


@dataclass(frozen=True)
class Ejection:
    """Outlier ejection, as Envoy's: a replica is avoided for `eject_s` after `consecutive_failures` failed calls
    in a row, or when fewer than `min_success_rate` of its last calls succeeded (once it served `min_calls` of
    them); never more than `max_ejected_share` of the replicas at once (at least one may always be ejected), so
    a fault that hits every replica does not leave the router with none."""

    eject_s: float = 2.0
    consecutive_failures: int = 1
    min_success_rate: float = 0.5
    min_calls: int = 20
    max_ejected_share: float = 0.5


class ReplicaSet:
    def __init__(
        self,
        client_factory: Callable[[str], Any],
        eject_s: float = 2.0,
        seed: int | None = None,
        latency_decay_s: float = 5.0,
        ejection: Ejection | None = None,
    ) -> None:
        self._client_factory = client_factory
        self.ejection = ejection or Ejection(eject_s=eject_s)
        self._decay_s = latency_decay_s
        self._random = random.Random(seed)
        self.replicas: dict[str, Replica] = {}
        self._merged: RepositoryState | None = None  # the replicas' states merged; None: recompute

    def update(self, addresses: Iterable[str]) -> list[Replica]:
        """Make the set match `addresses`; returns the removed replicas (their clients need closing)."""
        wanted = list(dict.fromkeys(a for a in addresses if a))
        removed = [r for a, r in self.replicas.items() if a not in wanted]
        for replica in removed:
            del self.replicas[replica.address]
        for address in wanted:
            if address not in self.replicas:
                self.replicas[address] = Replica(address, self._client_factory(address))
        self._merged = None
        self._publish()
        return removed

    def set_repository(self, replica: Replica, state: RepositoryState) -> None:
        """What the replica said it serves: from now on a model version goes only to replicas that take it."""
        replica.repository = state
        # UNLOADING too: a version announced to leave keeps taking requests through its grace, so a request that
        # resolved it just before the announcement still finds its replica.
        replica.ready = frozenset(
            (name, status.version)
            for name, model in state.models.items()
            for status in model.versions
            if status.state in (READY, UNLOADING)
        )
        self._merged = None

    def repository(self) -> RepositoryState:
        """The mesh's models: the replicas' states merged (a version is READY where a healthy replica has it READY;
        an unhealthy replica's models stay known, as UNAVAILABLE)."""
        if self._merged is None:
            self._merged = merge(
                r.repository if r.healthy else r.repository.unavailable("replica unavailable")
                for r in self.replicas.values()
                if r.repository is not None
            )
        return self._merged

    def choose(
        self, exclude: set[str] | frozenset[str] = frozenset(), serving: tuple[str, str] | None = None
    ) -> Replica:
        """Of the replicas that serve `serving` (model, version), the less loaded of two random ones."""
        now = time.monotonic()
        able = [r for r in self.replicas.values() if r.address not in exclude and r.serves(serving)]
        candidates = [r for r in able if r.available(now)]
        if not candidates:
            # Every replica is ejected or already tried: an ejected one is better than failing outright.
            candidates = able
        if not candidates:
            if serving is not None and not any(r.serves(serving) for r in self.replicas.values()):
                raise Unavailable(f"no model service replica serves model '{serving[0]}' version '{serving[1]}'")
            raise Unavailable("no model service replica is available")
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._random.sample(candidates, 2)
        if first.cost(now, self._decay_s) == second.cost(now, self._decay_s):
            return first if first.inflight <= second.inflight else second
        return first if first.cost(now, self._decay_s) < second.cost(now, self._decay_s) else second

    def report_failure(self, replica: Replica) -> None:
        replica.failures += 1
        replica.outcomes.append(False)
        rule = self.ejection
        consecutive = replica.failures >= rule.consecutive_failures
        calls = len(replica.outcomes)
        poor = calls >= min(rule.min_calls, OUTCOME_WINDOW) and sum(replica.outcomes) / calls < rule.min_success_rate
        if (consecutive or poor) and self._may_eject(replica):
            replica.ejected_until = time.monotonic() + rule.eject_s
            replica.outcomes.clear()  # judged afresh when it comes back
            metrics.EJECTIONS.labels("consecutive_failures" if consecutive else "success_rate").inc()
            self._publish()

    def _may_eject(self, replica: Replica) -> bool:
        now = time.monotonic()
        if not replica.available(now):
            return True  # already out: the ejection is only extended
        ejected = sum(1 for r in self.replicas.values() if r.healthy and not r.available(now))
        allowed = max(1, int(self.ejection.max_ejected_share * len(self.replicas)))
        return ejected < allowed

    def report_success(self, replica: Replica, latency_s: float | None = None) -> None:
        if latency_s is not None:
            replica.observe(latency_s, time.monotonic(), self._decay_s)
        replica.outcomes.append(True)
        if replica.failures:
            replica.failures = 0
            if replica.ejected_until:
                replica.ejected_until = 0.0
                self._publish()

    def set_health(self, replica: Replica, healthy: bool) -> None:
        if replica.healthy != healthy:
            replica.healthy = healthy
            self._merged = None
            if healthy:
                replica.ejected_until = 0.0
            self._publish()

    @property
    def up_count(self) -> int:
        now = time.monotonic()
        return sum(1 for r in self.replicas.values() if r.available(now))

    def _publish(self) -> None:
        metrics.REPLICAS_UP.set(self.up_count)
