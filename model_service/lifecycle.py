"""Changing models while serving: load, reload and unload model versions without failing a request.

A version is loaded and warmed up in a worker thread, and only then takes requests (READY). A reload of a
version swaps in the new instance at once and lets the old one finish what it queued. A version leaving service is
first announced (UNLOADING) and keeps serving for `unload_grace_s`, so that every router, which polls the replicas'
states, stops sending to it before it stops taking requests; then what it queued drains. Loads and unloads of one
model are serialized; different models change independently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from infermesh import metrics
from infermesh.errors import FailedPrecondition, NotFound, Unavailable
from infermesh.model_config import LOADING, UNLOADING
from infermesh.statistics import ModelStatistics
from model_service.batcher import Batcher
from model_service.registry import LoadedModel, LoadPlan, ModelRegistry

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0  # what a retired version may still have queued gets this long to finish


class ModelLifecycle:
    def __init__(
        self,
        registry: ModelRegistry,
        start_batcher: Callable[[LoadedModel, ModelStatistics], Batcher],
        unload_grace_s: float,
    ) -> None:
        self.registry = registry
        self._start_batcher = start_batcher
        self._unload_grace_s = unload_grace_s
        self.batchers: dict[tuple[str, str], Batcher] = {}
        # Kept across reloads of a version (Triton's figures are since start); bounded by the repository's versions.
        self.statistics: dict[tuple[str, str], ModelStatistics] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one per model of the repository: bounded by it
        self._draining: set[asyncio.Task[None]] = set()
        self._fingerprints: dict[str, tuple[object, ...]] = {}

    def serving(self, name: str, version: str) -> tuple[LoadedModel, Batcher]:
        """The loaded version a request means and its batcher (NotFound / Unavailable otherwise)."""
        model = self.registry.get(name, version)
        batcher = self.batchers.get((name, model.version))
        if batcher is None:  # loaded but not yet started: only inside load()
            raise Unavailable(f"model '{name}' version '{model.version}' is not serving yet")
        return model, batcher

    async def load_all(self) -> None:
        """Every model of the repository, by its version policy; a model that fails is logged, the rest load."""
        for name in await asyncio.to_thread(self.registry.discover):
            try:
                await self.load(name)
            except (FailedPrecondition, NotFound, ValueError) as error:
                log.error("model not loaded", extra={"fields": {"model": name, "reason": str(error)}})

    async def load(self, name: str, config_json: str | None = None) -> None:
        """(Re)load a model from its folder, or with `config_json` instead of its config.json: new versions are
        loaded and warmed before they take requests, versions the policy no longer serves are retired.
        FailedPrecondition when a version failed to load (the others still change)."""
        async with self._lock(name):
            plan = await asyncio.to_thread(self.registry.plan, name, config_json)
            self.registry.apply_config(plan)
            for version in plan.to_load:
                if (name, version) not in self.batchers:
                    self.registry.set_state(name, version, LOADING)
            failures: list[str] = []
            for version in plan.to_load:
                try:
                    model = await asyncio.to_thread(self._load_version, plan, version)
                except Exception as error:
                    failures.append(f"version '{version}': {self.registry.refuse(name, version, error)}")
                    continue
                self._serve(model)
            await self._retire(name, plan.to_retire)
            if failures:
                raise FailedPrecondition(f"model '{name}' failed to load: " + "; ".join(failures))

    def _load_version(self, plan: LoadPlan, version: str) -> LoadedModel:
        self.registry.configure_thread()
        return self.registry.load_version(plan, version)

    async def unload(self, name: str) -> None:
        """Take every version of the model out of service (announced, served through the grace, drained)."""
        async with self._lock(name):
            held = self.registry.models.get(name)
            if held is None:
                raise NotFound(f"model '{name}' not found")
            await self._retire(name, list(held.loaded))

    def _serve(self, model: LoadedModel) -> None:
        key = (model.name, model.version)
        statistics = self.statistics.get(key)
        if statistics is None:
            statistics = self.statistics[key] = ModelStatistics(*key)
        batcher = self._start_batcher(model, statistics)
        self.registry.put(model)
        previous = self.batchers.get(key)
        self.batchers[key] = batcher  # from now on new requests go to the new instance
        metrics.MODEL_LOADED.labels(*key).set(1)
        if previous is not None:
            self._drain_later(previous)

    async def _retire(self, name: str, versions: list[str]) -> None:
        if not versions:
            return
        for version in versions:
            self.registry.set_state(name, version, UNLOADING)
        await asyncio.sleep(self._unload_grace_s)  # routers see UNLOADING and stop sending first
        for version in versions:
            self.registry.remove(name, version)
            metrics.MODEL_LOADED.labels(name, version).set(0)
            batcher = self.batchers.pop((name, version), None)
            if batcher is not None:
                self._drain_later(batcher)
        log.info("model versions unloaded", extra={"fields": {"model": name, "versions": ",".join(versions)}})

    def _drain_later(self, batcher: Batcher) -> None:
        task = asyncio.get_running_loop().create_task(batcher.drain(DRAIN_TIMEOUT_S))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    # Poll mode ---------------------------------------------------------------------------------------

    async def poll(self) -> None:
        """Reload models whose folder changed (config, version folders, weights), load new ones, unload those
        whose folder is gone."""
        names = set(await asyncio.to_thread(self.registry.discover))
        for name in sorted(names | set(self.registry.models)):
            if name not in names:
                if self.registry.models[name].loaded:
                    await self.unload(name)
                self._fingerprints.pop(name, None)
                continue
            fingerprint = await asyncio.to_thread(self._fingerprint, name)
            if fingerprint == self._fingerprints.get(name):
                continue
            # Read only here (poll mode): the first poll, or one after an explicit load, finds nothing to change.
            self._fingerprints[name] = fingerprint
            try:
                await self.load(name)
            except (FailedPrecondition, NotFound, ValueError) as error:
                log.error("model not loaded", extra={"fields": {"model": name, "reason": str(error)}})

    def _fingerprint(self, name: str) -> tuple[object, ...]:
        """What a change of the model's folder shows in: file names, sizes and modification times."""
        folder = self.registry.root / name
        found: list[object] = []
        for path in sorted(folder.glob("*")):
            candidates = [path] if path.is_file() else sorted(path.glob("*")) if path.name.isdigit() else []
            for file in candidates:
                try:
                    stat = file.stat()
                except OSError:
                    continue
                found.append((str(file.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
        return tuple(found)

    async def close(self) -> None:
        batchers = list(self.batchers.values())  # kept: a closed batcher refuses with Unavailable
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*(batcher.close() for batcher in batchers), return_exceptions=True)
