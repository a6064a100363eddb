"""Fair share per tenant: token bucket and in-flight quota (pure logic, a clock of our own)."""

from __future__ import annotations

import pytest

from gateway.auth import UNLIMITED, Quota, Tenant
from gateway.quotas import TenantQuotas
from infermesh.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str = "acme", **quota: float) -> Tenant:
    return Tenant(name, frozenset({"*"}), quota=Quota(**quota) if quota else UNLIMITED)  # type: ignore[arg-type]


def take(quotas: TenantQuotas, who: Tenant) -> None:
    """One request, admitted and done."""
    with quotas.admit(who):
        pass


def test_the_bucket_allows_its_burst_then_its_rate_and_says_when_to_come_back() -> None:
    clock = Clock()
    quotas = TenantQuotas(clock)
    acme = tenant(rate_per_s=10, burst=3)
    for _ in range(3):
        with quotas.admit(acme):
            pass
    with pytest.raises(Overloaded, match="tenant 'acme' is over its rate of 10 requests/s") as refused:
        take(quotas, acme)
    assert refused.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1  # one token refilled
    with quotas.admit(acme):
        pass
    with pytest.raises(Overloaded), quotas.admit(acme):
        pass
    clock.now += 60  # never more than the burst
    for _ in range(3):
        with quotas.admit(acme):
            pass
    with pytest.raises(Overloaded), quotas.admit(acme):
        pass


def test_asking_what_admit_would_refuse_takes_nothing() -> None:
    clock = Clock()
    quotas = TenantQuotas(clock)
    acme = tenant(rate_per_s=10, burst=2, max_inflight=1)
    assert quotas.refusal(acme) is None and quotas.refusal(acme) is None  # asked twice: both tokens still there
    with quotas.admit(acme):
        in_flight = quotas.refusal(acme)
        assert in_flight is not None and "requests in flight" in str(in_flight)
    take(quotas, acme)
    rate = quotas.refusal(acme)
    assert rate is not None and rate.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    assert quotas.refusal(tenant("free")) is None and quotas.refusal(acme) is None
    take(quotas, acme)


def test_the_in_flight_quota_frees_as_requests_end() -> None:
    quotas = TenantQuotas(Clock())
    acme = tenant(max_inflight=2)
    with quotas.admit(acme), quotas.admit(acme):
        with pytest.raises(Overloaded, match="tenant 'acme' has 2 requests in flight") as refused:
            take(quotas, acme)
        assert refused.value.retry_after_s is not None
    with quotas.admit(acme):
        pass


def test_tenants_do_not_share_quotas_and_unlimited_ones_are_not_tracked() -> None:
    quotas = TenantQuotas(Clock())
    flood, calm = tenant("flood", rate_per_s=1, burst=1), tenant("calm", rate_per_s=1, burst=1)
    with quotas.admit(flood):
        pass
    with pytest.raises(Overloaded), quotas.admit(flood):
        pass
    with quotas.admit(calm):
        pass
    for _ in range(100):
        with quotas.admit(tenant("free")):
            pass
    assert len(quotas) == 2


def test_the_table_is_bounded_and_forgets_idle_tenants_first() -> None:
    quotas = TenantQuotas(Clock())
    quotas.MAX_TENANTS = 3
    busy = tenant("busy", max_inflight=5)
    with quotas.admit(busy):
        for i in range(10):
            with quotas.admit(tenant(f"t{i}", max_inflight=5)):
                pass
        assert len(quotas) == 3
        held = [quotas.admit(busy) for _ in range(4)]
        for admitted in held:
            admitted.__enter__()
        with pytest.raises(Overloaded):  # the busy tenant's count (5 in flight) survived the churn
            take(quotas, busy)
