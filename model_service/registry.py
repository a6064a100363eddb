"""Loads the TorchScript models of the repository, verified by SHA-256 and warmed up, and runs forward passes.

Only TorchScript files are loaded (`torch.jit.load`): no pickled Python code is executed. A version whose
weights do not match the digest its model's config.json pins (`version_digests`), fail to load, or do not
produce the declared outputs is refused (logged, reported UNAVAILABLE with the reason); the other models still
load. Without a pin a version is refused too, unless `require_pinned_digest` is off: then its `.sha256` sidecar
(inside the version folder, so it only guards against corruption, not tampering) is checked instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infermesh.drift import MAX_PROFILE_BYTES, PROFILE_FILE, profile_for
from infermesh.errors import DomainError, InvalidInput, NotFound
from infermesh.heap import return_large_blocks_to_the_os
from infermesh.model_config import (
    CONFIG_FILE,
    MAX_LABEL_FILE_BYTES,
    MAX_LABELS,
    MODEL_FILE,
    READY,
    UNAVAILABLE,
    ModelConfig,
    ModelEntry,
    TensorSpec,
    VersionStatus,
    first_line,
    parse_checked,
    read_config,
    version_folders,
)
from infermesh.repository import ModelState, RepositoryState
from infermesh.tensors import NUMPY_DTYPE

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
WARM_UP_ROWS = 2

TORCH_DTYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}


def _with_labels(config: ModelConfig, folder: Path) -> ModelConfig:
    """Each output's `label_filename` (a file of the model's folder) read into its `labels`, as Triton reads them
    at load: they travel with the config to the gateway, which answers the classification extension."""
    if not any(spec.label_filename and spec.labels is None for spec in config.outputs):
        return config
    outputs = [
        {**spec.model_dump(), "labels": _read_labels(config.name, spec.name, folder, spec.label_filename)}
        if spec.label_filename and spec.labels is None
        else spec.model_dump()
        for spec in config.outputs
    ]
    return ModelConfig.model_validate({**config.model_dump(), "outputs": outputs})


def _read_labels(model: str, output: str, folder: Path, filename: str) -> list[str]:
    path = folder / filename
    what = f"model '{model}' output '{output}': label_filename '{filename}'"
    if path.parent != folder or not path.is_file():
        raise InvalidInput(f"{what} is not a file of the model's folder")
    if path.stat().st_size > MAX_LABEL_FILE_BYTES:
        raise InvalidInput(f"{what} is larger than {MAX_LABEL_FILE_BYTES} bytes")
    try:
        labels = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise InvalidInput(f"{what} cannot be read as UTF-8 text") from None
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{what} has more than {MAX_LABELS} labels")
    return labels


def _is_dir(path: Path) -> bool:
    """False also for a path the OS refuses to look at (a name longer than the file system allows)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def resolve_device(name: str) -> torch.device:
    """`auto` → the first CUDA device if there is one, else the CPU. A CUDA device asked for by name must exist:
    a replica told to use a GPU it does not have fails at start instead of serving no model at all."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device '{name}' asked for, but there is no CUDA device here")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device '{name}' asked for, but there are only {count} CUDA devices here")
    return device


def verify_weights(config: ModelConfig, version: str, weights: Path, data: bytes, require_pin: bool) -> str:
    """The SHA-256 of `data` (the bytes read from `weights`) once it matches what the config pins for `version`;
    ValueError saying why not. Without a pin: refused when `require_pin`, else checked against the sidecar."""
    pinned = config.pinned_digest(version)
    if pinned is None:
        if require_pin:
            raise ValueError(
                f"no pinned digest: {CONFIG_FILE} has no version_digests entry for version {version} "
                "(pin it with `infermesh models publish`, or set MODEL_SERVICE_REQUIRE_PINNED_DIGEST=false)"
            )
        return verify_checksum(weights, data)
    actual = hashlib.sha256(data).hexdigest()
    if actual != pinned:
        raise ValueError(f"SHA-256 mismatch: the weights have {actual}, {CONFIG_FILE} pins {pinned}")
    return actual


def verify_checksum(weights: Path, data: bytes) -> str:
    """The SHA-256 of `data` (the bytes read from `weights`); ValueError unless `<weights>.sha256` exists and its
    first token is that digest."""
    sidecar = weights.with_name(weights.name + CHECKSUM_SUFFIX)
    if not sidecar.is_file():
        raise ValueError(f"missing checksum file {sidecar.name}")
    tokens = sidecar.read_text().split()
    expected = tokens[0].lower() if tokens else ""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"SHA-256 mismatch: file has {actual}, {sidecar.name} says {expected or '(empty)'}")
    return actual


def _to_torch(array: np.ndarray, datatype: str, device: torch.device) -> torch.Tensor:
    if not array.flags.writeable or not array.flags.c_contiguous:
        # Decoded raw inputs are read-only views of the request buffer; torch wants memory it may write.
        array = np.array(array, order="C")
    if datatype == "BF16":  # carried as uint16 bit patterns (infermesh.tensors)
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(device, non_blocking=device.type == "cuda")


def _to_numpy(tensor: torch.Tensor, spec: TensorSpec) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if spec.datatype == "BF16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    wanted = TORCH_DTYPE.get(spec.datatype)
    if wanted is not None and tensor.dtype != wanted:
        tensor = tensor.to(wanted)  # e.g. float16 under autocast → the declared FP32
    return tensor.numpy().astype(NUMPY_DTYPE[spec.datatype], copy=False)


def _batch_shape(spec: TensorSpec, array: np.ndarray, rows: int) -> np.ndarray:
    """Reshape a model output to [N, ...declared dims] (e.g. [N, 1] → [N] for a declared shape [-1])."""
    rest = spec.shape[1:]
    if array.ndim >= 1 and array.shape[0] == rows and list(array.shape[1:]) == rest:
        return array
    if sum(1 for dim in rest if dim < 0) <= 1:
        try:
            return array.reshape((rows, *rest))
        except ValueError:
            pass
    elif array.ndim == len(spec.shape) and array.shape[0] == rows:
        return array
    raise RuntimeError(f"output '{spec.name}' has shape {list(array.shape)}, declared {spec.shape} for {rows} rows")


@dataclass
class LoadedModel:
    """One ready model version: the TorchScript module plus what it needs to run a batch."""

    config: ModelConfig
    version: str
    module: torch.jit.ScriptModule
    device: torch.device
    amp: bool = False
    digest: str = ""  # SHA-256 of the weights it was loaded from
    profile: str = ""  # its baseline profile (infermesh.drift) as JSON, validated; "" when it has none
    input_specs: list[TensorSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.input_specs = self.config.served_inputs

    @property
    def name(self) -> str:
        return self.config.name

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over a batch; blocking (run it in a worker thread). Inputs are [N, ...] arrays."""
        rows = int(inputs[self.input_specs[0].name].shape[0])
        # inference_mode is thread-local, so it is entered here, in the thread that computes.
        with torch.inference_mode(), self._autocast():
            arguments = [_to_torch(inputs[spec.name], spec.datatype, self.device) for spec in self.input_specs]
            result = self.module(*arguments)
        tensors = list(result) if isinstance(result, tuple | list) else [result]
        specs = self.config.outputs
        if len(tensors) != len(specs):
            raise RuntimeError(f"model '{self.name}' returned {len(tensors)} outputs, config declares {len(specs)}")
        return {spec.name: _batch_shape(spec, _to_numpy(t, spec), rows) for spec, t in zip(specs, tensors, strict=True)}

    def warm_up(self) -> None:
        """A forward pass over a small batch of zeros: compiles/allocates now, and checks the declared outputs."""
        rows = min(WARM_UP_ROWS, self.config.max_batch_size)
        batch = {
            spec.name: np.zeros(_example_shape(spec, rows), dtype=NUMPY_DTYPE[spec.datatype])
            for spec in self.input_specs
        }
        outputs = self.predict(batch)
        for spec in self.config.outputs:
            if outputs[spec.name].shape[0] != rows:
                raise RuntimeError(f"output '{spec.name}' has {outputs[spec.name].shape[0]} rows for {rows} inputs")

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()


def _example_shape(spec: TensorSpec, rows: int) -> tuple[int, ...]:
    return (rows, *(dim if dim > 0 else 1 for dim in spec.shape[1:]))


@dataclass
class _Model:
    """A model of the repository as this service holds it: the config in force, its loaded versions and the
    state of every version it knows of."""

    config: ModelConfig
    config_json: str
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    statuses: dict[str, VersionStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadPlan:
    """What loading a model means now: the config to apply and, of the versions its policy serves, those to
    (re)load (new, changed weights or a changed config) and those to retire."""

    name: str
    config: ModelConfig
    config_json: str
    to_load: list[str]
    to_retire: list[str]
    folder: Path


class ModelRegistry:
    """The models of the repository this service loaded, and the state of each version (Triton's READY, LOADING,
    UNLOADING, UNAVAILABLE with a reason). The blocking parts (reading the folder, loading weights) run in a
    worker thread; the state changes run on the event loop (model_service.lifecycle), one model at a time."""

    def __init__(
        self,
        root: Path,
        device: str = "auto",
        amp: bool = False,
        torch_threads: int = 1,
        require_pinned_digest: bool = True,
    ) -> None:
        return_large_blocks_to_the_os()  # before any weights are loaded
        self.root = root
        self.require_pinned_digest = require_pinned_digest
        self.device = resolve_device(device)
        self.amp = amp
        self.torch_threads = torch_threads
        self.models: dict[str, _Model] = {}
        self._boot = secrets.token_hex(4)  # a restarted service is a new generation even at the same count
        self._changes = 0
        self._entries: dict[str, ModelEntry] = {}
        self._entries_at = -1

    def _expected_digest(self, config: ModelConfig, folder: Path, version: str) -> str:
        """The digest a version's weights must have now: its pin, else (pins not required) its sidecar's."""
        pinned = config.pinned_digest(version)
        if pinned is not None or self.require_pinned_digest:
            return pinned or ""
        return _sidecar_digest(folder, version)

    def configure_thread(self) -> None:
        """Apply `torch_threads` to the calling thread: with OpenMP the intra-op thread count is per thread."""
        torch.set_num_threads(self.torch_threads)

    # Reading the repository (blocking) ----------------------------------------------------------------

    def discover(self) -> list[str]:
        """The model folders of the repository (each with a config.json)."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{CONFIG_FILE}"))

    def plan(self, name: str, config_json: str | None = None) -> LoadPlan:
        """What `load(name)` has to do: re-read the model's folder (its config, unless one is given) and compare
        with what is loaded. NotFound for a model the repository lacks; InvalidInput for an invalid config."""
        folder = self.root / name
        if not name or name.startswith(".") or folder.parent != self.root or not _is_dir(folder):
            raise NotFound(f"model '{name}' is not in the model repository")
        overridden = config_json is not None
        if config_json is None:
            try:
                config_json = (folder / CONFIG_FILE).read_text()
            except OSError as error:
                raise InvalidInput(f"model '{name}': cannot read its {CONFIG_FILE}: {error.strerror}") from None
        config = parse_checked(name, config_json)
        if overridden:
            # The pins are the repository's: a load's override (an API call) cannot choose which bytes are trusted.
            config = config.model_copy(update={"version_digests": _repository_pins(folder)})
        config = _with_labels(config, folder)
        normalized = config.model_dump_json()
        wanted = config.served_versions(version_folders(folder))
        held = self.models.get(name)
        loaded = held.loaded if held is not None else {}
        same_config = held is not None and held.config.serving_json == config.serving_json
        to_load = [
            version
            for version in wanted
            if not same_config
            or version not in loaded
            or loaded[version].digest != self._expected_digest(config, folder, version)
        ]
        to_retire = [version for version in loaded if version not in wanted]
        return LoadPlan(name, config, normalized, to_load, to_retire, folder)

    def load_version(self, plan: LoadPlan, version: str) -> LoadedModel:
        """Verify, load and warm up one version (blocking). The module is loaded from the very bytes that were
        hashed, so a file changed in between cannot slip through."""
        config = plan.config
        unsupported = [spec.name for spec in config.served_inputs if spec.datatype not in TORCH_DTYPE]
        if unsupported:
            raise ValueError(f"inputs {unsupported} have datatypes torch cannot take")
        weights = plan.folder / version / MODEL_FILE
        data = weights.read_bytes()
        digest = verify_weights(config, version, weights, data, self.require_pinned_digest)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream in favour of torch.export, yet it is the format we serve.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=self.device)  # type: ignore[no-untyped-call]  # torch.jit is unannotated
        module.eval()
        model = LoadedModel(config, version, module, self.device, self.amp, digest, read_profile(plan, version))
        model.warm_up()
        return model

    def load_all(self) -> None:
        """Load every model of the repository by its version policy, without batchers (blocking; for tools and
        tests — the service loads through model_service.lifecycle)."""
        self.configure_thread()
        for name in self.discover():
            try:
                plan = self.plan(name)
            except DomainError as error:
                log.error("model refused", extra={"fields": {"model": name, "reason": str(error)}})
                continue
            self.apply_config(plan)
            for version in plan.to_load:
                try:
                    self.put(self.load_version(plan, version))
                except Exception as error:  # one bad model must not keep the others from serving
                    self.refuse(name, version, error)

    # State changes (on the event loop) ----------------------------------------------------------------

    def apply_config(self, plan: LoadPlan) -> None:
        held = self.models.get(plan.name)
        if held is None:
            self.models[plan.name] = _Model(plan.config, plan.config_json)
        else:
            held.config, held.config_json = plan.config, plan.config_json
        self._changed()

    def set_state(self, name: str, version: str, state: str, reason: str = "") -> None:
        self.models[name].statuses[version] = VersionStatus(version, state, reason)
        self._changed()

    def put(self, model: LoadedModel) -> LoadedModel | None:
        """Serve this loaded version (READY); the one it replaces, if any, is returned for draining."""
        held = self.models[model.name]
        previous = held.loaded.get(model.version)
        held.loaded[model.version] = model
        held.statuses[model.version] = VersionStatus(model.version, READY, profile=model.profile)
        self._changed()
        log.info("model ready", extra={"fields": {"model": model.name, "version": model.version}})
        return previous

    def refuse(self, name: str, version: str, error: BaseException) -> str:
        """A version that failed to load: UNAVAILABLE with the reason, unless an earlier load of it still serves."""
        reason = load_failure_reason(error)
        log.error("model refused", extra={"fields": {"model": name, "version": version, "reason": reason}})
        held = self.models[name]
        if version not in held.loaded:
            held.statuses[version] = VersionStatus(version, UNAVAILABLE, reason)
        self._changed()
        return reason

    def remove(self, name: str, version: str, reason: str = "unloaded") -> LoadedModel | None:
        """Stop serving a version (UNAVAILABLE, unloaded); the loaded model is returned for draining."""
        held = self.models[name]
        model = held.loaded.pop(version, None)
        held.statuses[version] = VersionStatus(version, UNAVAILABLE, reason)
        self._changed()
        return model

    def _changed(self) -> None:
        self._changes += 1

    # Queries --------------------------------------------------------------------------------------------

    @property
    def generation(self) -> str:
        return f"{self._boot}-{self._changes}"

    def state(self) -> RepositoryState:
        return RepositoryState(
            self.generation,
            {
                name: ModelState(held.config, held.config_json, tuple(held.statuses[v] for v in _ascending(held)))
                for name, held in self.models.items()
            },
        )

    @property
    def failures(self) -> dict[tuple[str, str], str]:
        return {
            (name, status.version): status.reason
            for name, held in self.models.items()
            for status in held.statuses.values()
            if status.state == UNAVAILABLE
        }

    def entry(self, name: str) -> ModelEntry:
        """The model with its ready versions; NotFound if this service does not know it. Built once per change:
        every request looks it up."""
        if self._entries_at != self._changes:
            self._entries = {
                model: ModelEntry(
                    held.config, sorted(held.loaded, key=int), tuple(held.statuses[v] for v in _ascending(held))
                )
                for model, held in self.models.items()
            }
            self._entries_at = self._changes
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' not found")
        return entry

    def ready_versions(self, name: str) -> list[str]:
        return self.entry(name).versions

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded version a request means (the newest ready one when none is named); NotFound for an unknown
        model or version, Unavailable for a version that is not ready."""
        resolved = self.entry(name).resolve_version(version)
        return self.models[name].loaded[resolved]

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except DomainError:
            return False
        return True


def read_profile(plan: LoadPlan, version: str) -> str:
    """The version's profile.json, validated against its config and compacted; "" when it has none or it is not
    usable (logged: the version serves all the same, without drift figures). The profile is data, not code: unlike
    the weights it is not checksummed, only validated."""
    path = plan.folder / version / PROFILE_FILE
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ValueError(f"{PROFILE_FILE} is larger than {MAX_PROFILE_BYTES} bytes")
        return profile_for(plan.config, path.read_text()).to_json()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        fields = {"model": plan.name, "version": version, "reason": reason}
        log.error("profile ignored", extra={"fields": fields})
        return ""


def _ascending(held: _Model) -> list[str]:
    return sorted(held.statuses, key=int)


def _repository_pins(folder: Path) -> dict[str, str]:
    """The version_digests of the model's config.json in the repository; none when it cannot be read or parsed
    (then every version is refused, or checked by its sidecar, as require_pinned_digest says)."""
    try:
        return read_config(folder).version_digests
    except (OSError, ValueError):
        return {}


def _sidecar_digest(folder: Path, version: str) -> str:
    sidecar = folder / version / (MODEL_FILE + CHECKSUM_SUFFIX)
    try:
        tokens = sidecar.read_text().split()
    except OSError:
        return ""
    return tokens[0].lower() if tokens else ""


def load_failure_reason(error: BaseException) -> str:
    """What an admin is told about a version that did not load: the first line of what failed (our checks, the
    warm-up, torch's reader of a bytes buffer: no paths), the OS's reason for a file it could not read."""
    if isinstance(error, OSError):
        return f"cannot read the weights: {error.strerror or type(error).__name__}"
    if isinstance(error, ValueError | RuntimeError | DomainError):
        return first_line(error)
    return "failed to load (see the model service's log)"
