"""Fair share per tenant: a token bucket (requests per second, burst) and an in-flight quota each, from the key
file's `tenants` section. Past either, RESOURCE_EXHAUSTED at once, with a retry hint. Pure logic."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from gateway.auth import Tenant
from infermesh import metrics
from infermesh.errors import Overloaded

INFLIGHT_RETRY_S = 0.01  # a slot frees when one of the tenant's own requests ends: soon


@dataclass(slots=True)
class _Usage:
    tokens: float
    refilled_at: float
    inflight: int = 0


class _InFlight(AbstractContextManager[None]):
    """One admitted request: counted in its tenant's in-flight usage until it ends."""

    __slots__ = ("_usage",)

    def __init__(self, usage: _Usage) -> None:
        self._usage = usage
        usage.inflight += 1

    def __exit__(self, *exc: object) -> None:
        self._usage.inflight -= 1


_UNTRACKED = nullcontext()


class TenantQuotas:
    """Usage per tenant, in a bounded table: idle tenants are forgotten first (their bucket refills to full
    while unused anyway)."""

    MAX_TENANTS = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._usage: OrderedDict[str, _Usage] = OrderedDict()
        self._rejected_rate = metrics.ADMISSION_REJECTED.labels("gateway", "tenant_rate")
        self._rejected_inflight = metrics.ADMISSION_REJECTED.labels("gateway", "tenant_inflight")

    def admit(self, tenant: Tenant) -> AbstractContextManager[None]:
        """Admit one request of the tenant (RESOURCE_EXHAUSTED at once past its quota), for as long as the
        returned context is open. A tenant without a quota costs nothing here."""
        if not tenant.quota.limited:
            return _UNTRACKED
        usage = self._usage_of(tenant)
        refusal = self._refusal(tenant, usage)
        if refusal is not None:
            raise refusal
        if tenant.quota.rate_per_s is not None:
            usage.tokens -= 1.0
        return _InFlight(usage)

    def refusal(self, tenant: Tenant) -> Overloaded | None:
        """What `admit` would refuse the tenant's next request with now (counted), taking nothing: the gateway
        asks as a call starts, so that a tenant past its quota costs no body read or parse."""
        return self._refusal(tenant, self._usage_of(tenant)) if tenant.quota.limited else None

    def _refusal(self, tenant: Tenant, usage: _Usage) -> Overloaded | None:
        quota = tenant.quota
        if quota.max_inflight is not None and usage.inflight >= quota.max_inflight:
            self._rejected_inflight.inc()
            return Overloaded(
                f"tenant '{tenant.name}' has {usage.inflight} requests in flight, its quota", INFLIGHT_RETRY_S
            )
        if quota.rate_per_s is not None:
            burst = float(quota.burst or 1)
            now = self._clock()
            usage.tokens = min(burst, usage.tokens + (now - usage.refilled_at) * quota.rate_per_s)
            usage.refilled_at = now
            if usage.tokens < 1.0 - 1e-9:  # a whole token, give or take float rounding
                self._rejected_rate.inc()
                return Overloaded(
                    f"tenant '{tenant.name}' is over its rate of {quota.rate_per_s:g} requests/s",
                    (1.0 - usage.tokens) / quota.rate_per_s,
                )
        return None

    def _usage_of(self, tenant: Tenant) -> _Usage:
        usage = self._usage.get(tenant.name)
        if usage is None:
            burst = float(tenant.quota.burst or 1)
            usage = self._usage[tenant.name] = _Usage(burst, self._clock())
            if len(self._usage) > self.MAX_TENANTS:
                self._forget_one_idle()
        else:
            self._usage.move_to_end(tenant.name)
        return usage

    def _forget_one_idle(self) -> None:
        for name, usage in self._usage.items():  # least recently used first
            if usage.inflight == 0:
                del self._usage[name]
                return

    def __len__(self) -> int:
        return len(self._usage)
