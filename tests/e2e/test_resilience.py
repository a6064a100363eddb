"""Faults under load: a replica killed mid-stream loses nothing; overload is refused at once; SIGTERM drains."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from demo.mesh import LocalMesh
from tests.e2e.meshes import auth, fraud_inputs, metric, start_mesh


def inputs(i: int) -> list:
    return fraud_inputs([f"u{i % 10000}", f"u{(i * 7) % 10000}"], [f"m{i % 1000}", "m3"], [float(i % 500), 12.5])


async def inflight_reaches(metrics_port: int, count: int, timeout_s: float = 10.0) -> None:
    """Readiness poll of another process's state (its in-flight gauge); fails rather than hangs."""
    deadline = time.monotonic() + timeout_s
    while metric(metrics_port, "infermesh_inflight_requests", 'service="gateway"') < count:
        assert time.monotonic() < deadline, f"gateway never reached {count} in-flight requests"
        await asyncio.sleep(0.01)


async def test_killing_a_replica_under_load_loses_no_request(demo_dir: Path, tmp_path: Path) -> None:
    mesh = await asyncio.to_thread(start_mesh, demo_dir, tmp_path)
    try:
        outcomes: list[str] = []
        progress = asyncio.Condition()
        stop = asyncio.Event()

        async def reached(count: int) -> None:
            async with progress:
                await progress.wait_for(lambda: len(outcomes) >= count)

        async def worker(client: aioclient.InferenceServerClient, offset: int) -> None:
            i = offset
            while not stop.is_set():
                try:
                    result = await client.infer("fraud", inputs(i), headers=auth(), client_timeout=10)
                    assert result.as_numpy("fraud_probability").shape == (2,)
                    outcomes.append("ok")
                except InferenceServerException as error:
                    outcomes.append(f"{error.status()}: {error.message()}")
                async with progress:
                    progress.notify_all()
                i += 16

        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            workers = [asyncio.create_task(worker(client, k)) for k in range(16)]
            await reached(200)  # steady load established on both replicas
            victim = mesh.model_services[0]
            victim.kill()  # SIGKILL: no drain, connections drop mid-request
            killed_at = len(outcomes)
            await reached(killed_at + 600)
            replica = await asyncio.to_thread(mesh.restart_model_service, 0)
            # The router finds the restarted replica again (health probe + reconnect) and sends it traffic.
            give_up = time.monotonic() + 20
            while metric(replica.metrics_port, "infermesh_requests_total", 'method="ModelInfer"') == 0:
                assert time.monotonic() < give_up, "restarted replica never received traffic"
                await reached(len(outcomes) + 50)
            stop.set()
            await asyncio.gather(*workers)
        failures = [o for o in outcomes if o != "ok"]
        assert failures == []
        assert len(outcomes) >= 800
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_overload_is_refused_at_once(demo_dir: Path, tmp_path: Path) -> None:
    mesh = await asyncio.to_thread(
        start_mesh,
        demo_dir,
        tmp_path,
        replicas=1,
        gateway={"max_inflight": 2},
        model_service={"inject_delay_ms": 1500},
    )
    try:
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            slow = [
                asyncio.create_task(client.infer("fraud", inputs(i), headers=auth(), client_timeout=20))
                for i in range(2)
            ]
            assert mesh.gateway is not None
            await inflight_reaches(mesh.gateway.metrics_port, 2)  # both admitted requests are in flight
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("fraud", inputs(3), headers=auth(), client_timeout=20)
            refused_after = time.monotonic() - started
            assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert refused_after < 0.5  # at once, not after the 1.5 s the admitted ones take
            results = await asyncio.gather(*slow)
            assert all(r.as_numpy("fraud_probability").shape == (2,) for r in results)
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_sigterm_drains_in_flight_requests(demo_dir: Path, tmp_path: Path) -> None:
    mesh: LocalMesh = await asyncio.to_thread(
        start_mesh, demo_dir, tmp_path, replicas=1, model_service={"inject_delay_ms": 800}
    )
    try:
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            pending = asyncio.create_task(client.infer("fraud", inputs(1), headers=auth(), client_timeout=20))
            assert mesh.gateway is not None
            await inflight_reaches(mesh.gateway.metrics_port, 1)
            exit_codes = await asyncio.to_thread(lambda: [p.stop() for p in mesh.processes()])
            result = await pending
            assert result.as_numpy("fraud_probability").shape == (2,)
            assert exit_codes == [0] * len(exit_codes)
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_feature_store_outage_default_answers_flagged_reject_fails_fast(demo_dir: Path, tmp_path: Path) -> None:
    from demo.seed import seed_demo_features

    mesh = await asyncio.to_thread(start_mesh, demo_dir, tmp_path, replicas=1)
    try:
        assert mesh.redis is not None
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            healthy = await client.infer("fraud", inputs(1), headers=auth())
            assert "infermesh_features_unavailable" not in healthy.get_response().parameters
            await asyncio.to_thread(mesh.redis.kill)

            degraded = await client.infer("fraud", inputs(1), headers=auth(), client_timeout=5)
            parameters = degraded.get_response().parameters
            assert parameters["infermesh_features_unavailable"].string_param == "true"
            assert "user_id=u1" in parameters["infermesh_defaulted_entities"].string_param
            assert degraded.as_numpy("fraud_probability").shape == (2,)

            started = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("fraud_strict", inputs(1), headers=auth(), client_timeout=5)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert time.monotonic() - started < 1.0  # fails fast, does not wait out the deadline

            await asyncio.to_thread(mesh.redis.restart_same_port)
            await seed_demo_features(mesh.redis_url, mesh.views_path)
            recovered = await client.infer("fraud_strict", inputs(1), headers=auth(), client_timeout=5)
            assert "infermesh_features_unavailable" not in recovered.get_response().parameters
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_a_stalled_redis_costs_default_requests_no_failure_and_reject_ones_fail_fast(
    demo_dir: Path, tmp_path: Path
) -> None:
    """Redis stops answering (CLIENT PAUSE) for 3 s under load: `fraud` (policy default) keeps answering, flagged,
    within its feature budget; `fraud_strict` (reject) fails at once; both recover by themselves."""
    import redis.asyncio as aioredis

    mesh = await asyncio.to_thread(start_mesh, demo_dir, tmp_path, replicas=1)
    try:
        admin = aioredis.from_url(mesh.redis_url)
        answers: list[tuple[float, str]] = []  # (sent at, "ok" / "flagged" / status)
        stop = asyncio.Event()
        progress = asyncio.Condition()

        async def answered(when: Callable[[], bool]) -> None:
            async with progress:
                await asyncio.wait_for(progress.wait_for(when), 15)

        async def worker(client: aioclient.InferenceServerClient, offset: int) -> None:
            i = offset
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    # 1 s: far less than the stall, so waiting it out would fail the request
                    result = await client.infer("fraud", inputs(i), headers=auth(), client_timeout=1.0)
                    flagged = "infermesh_features_unavailable" in result.get_response().parameters
                    answers.append((sent, "flagged" if flagged else "ok"))
                except InferenceServerException as error:
                    answers.append((sent, str(error.status())))
                async with progress:
                    progress.notify_all()
                i += 8

        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            workers = [asyncio.create_task(worker(client, k)) for k in range(8)]
            await answered(lambda: len(answers) >= 100)
            paused_at = time.monotonic()
            await admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            await asyncio.sleep(2.0)  # well into the stall (a span of real time is what is being tested)
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("fraud_strict", inputs(1), headers=auth(), client_timeout=2.0)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert time.monotonic() - started < 1.0  # the breaker is open: not even tried
            # After the stall: a probe closes the breaker and answers are whole again.
            await answered(lambda: any(sent > paused_at + 3.0 and what == "ok" for sent, what in answers[-20:]))
            stop.set()
            await asyncio.gather(*workers)
        during = [what for sent, what in answers if paused_at + 0.2 < sent < paused_at + 2.8]
        assert during and set(during) == {"flagged"}, sorted(set(during))
        assert all(what in ("ok", "flagged") for _, what in answers), {w for _, w in answers}
        await admin.aclose()
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_one_layer_retries_the_gateway_does_not_send_again_what_the_router_answered(
    demo_dir: Path, tmp_path: Path
) -> None:
    """The router retries the replicas itself; when it gives up, its UNAVAILABLE is final at the gateway (which
    used to send the request again, doubling the router's attempts)."""
    mesh = await asyncio.to_thread(
        start_mesh, demo_dir, tmp_path, replicas=1, router={"health_interval_s": 600, "repository_refresh_s": 600}
    )
    try:
        assert mesh.router is not None
        router_port = mesh.router.metrics_port
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            await client.infer("fraud", inputs(1), headers=auth())
            mesh.model_services[0].kill()  # the router will not notice by its probes (600 s)

            def router_calls() -> float:  # a request alone comes as ModelInfer, coalesced ones as InferBatch
                return sum(
                    metric(router_port, "infermesh_requests_total", f'method="{method}",model="fraud",service="router"')
                    for method in ("ModelInfer", "InferBatch")
                )

            before = router_calls()
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("fraud", inputs(2), headers=auth(), client_timeout=5)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert router_calls() - before == 1
            assert metric(router_port, "infermesh_retries_total", 'target="model_service"') >= 1  # it did retry
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_adaptive_admission_refuses_past_its_limit_at_once_with_a_retry_hint(
    demo_dir: Path, tmp_path: Path
) -> None:
    """With a latency target no request can meet, the gateway's adaptive limit falls to its floor and the excess is
    refused with RESOURCE_EXHAUSTED and a retry hint, while requests within the limit are answered."""
    gateway = {"admission_target_ms": 0.001, "admission_min_inflight": 2}
    mesh = await asyncio.to_thread(start_mesh, demo_dir, tmp_path, replicas=1, gateway=gateway)
    try:
        assert mesh.gateway is not None
        outcomes: list[str] = []

        async def worker(client: aioclient.InferenceServerClient, offset: int) -> None:
            for i in range(offset, offset + 80 * 12, 12):
                try:
                    await client.infer("fraud", inputs(i), headers=auth(), client_timeout=10)
                    outcomes.append("ok")
                except InferenceServerException as error:
                    outcomes.append(str(error.status()))

        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            await asyncio.gather(*(worker(client, k) for k in range(12)))
        assert set(outcomes) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}, set(outcomes)
        assert outcomes.count("ok") > 0 and outcomes.count("StatusCode.RESOURCE_EXHAUSTED") > 0
        assert metric(mesh.gateway.metrics_port, "infermesh_admission_limit", 'service="gateway"') == 2
    finally:
        await asyncio.to_thread(mesh.stop)


async def test_a_cancelled_request_is_dropped_downstream_not_computed(demo_dir: Path, tmp_path: Path) -> None:
    """A client that gives up (cancels) while its request waits in the model service's queue: the cancellation
    travels gateway → router → model service, which drops the request before computing it."""
    # Several router calls in flight at the gateway, so the second request travels on at once instead of waiting
    # at the gateway (where a cancel just drops it from the queue).
    mesh = await asyncio.to_thread(
        start_mesh,
        demo_dir,
        tmp_path,
        replicas=1,
        model_service={"inject_delay_ms": 500},
        gateway={"coalesce_max_inflight_batches": 4},
    )
    try:
        replica = mesh.model_services[0]
        inflight = 'service="model_service"'

        async def model_service_inflight(count: int) -> None:
            give_up = time.monotonic() + 10
            while metric(replica.metrics_port, "infermesh_inflight_requests", inflight) != count:
                assert time.monotonic() < give_up, f"model service never had {count} requests in flight"
                await asyncio.sleep(0.01)

        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            await client.infer("fraud", inputs(1), headers=auth(), client_timeout=10)
            stats = await client.get_inference_statistics("fraud", headers=auth(), as_json=True)
            executed = int(stats["model_stats"][0].get("execution_count", 0))
            held = asyncio.create_task(client.infer("fraud", inputs(2), headers=auth(), client_timeout=10))
            await model_service_inflight(1)  # its batch is in the forward pass (500 ms)
            victim = asyncio.create_task(client.infer("fraud", inputs(3), headers=auth(), client_timeout=10))
            await model_service_inflight(2)  # queued behind it at the model service
            victim.cancel()
            await model_service_inflight(1)  # dropped there at once, not at the end of the forward pass
            await held
            await model_service_inflight(0)
            stats = await client.get_inference_statistics("fraud", headers=auth(), as_json=True)
            assert int(stats["model_stats"][0]["execution_count"]) - executed == 1  # the victim never ran
        with pytest.raises(asyncio.CancelledError):
            await victim
    finally:
        await asyncio.to_thread(mesh.stop)
