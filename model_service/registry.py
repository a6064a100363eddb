"""Loads the TorchScript models of the repository, verified by SHA-256 and warmed up, and runs forward passes.

Only TorchScript files are loaded (`torch.jit.load`): no pickled Python code is executed. A version whose
weights do not match their `.sha256` sidecar, fail to load, or do not produce the declared outputs is
refused (logged, reported not ready); the other models still load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infermesh.errors import FailedPrecondition, NotFound
from infermesh.model_config import MODEL_FILE, ModelConfig, ModelEntry, TensorSpec, find_model, load_repository
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(weights: Path) -> None:
    """Raise ValueError unless `<weights>.sha256` exists and its first token is the file's SHA-256."""
    sidecar = weights.with_name(weights.name + CHECKSUM_SUFFIX)
    if not sidecar.is_file():
        raise ValueError(f"missing checksum file {sidecar.name}")
    tokens = sidecar.read_text().split()
    expected = tokens[0].lower() if tokens else ""
    actual = sha256_of(weights)
    if actual != expected:
        raise ValueError(f"SHA-256 mismatch: file has {actual}, {sidecar.name} says {expected or '(empty)'}")


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


class ModelRegistry:
    """Every model of the repository and the state of each version (ready, or refused with a reason)."""

    def __init__(self, root: Path, device: str = "auto", amp: bool = False, torch_threads: int = 1) -> None:
        self.root = root
        self.device = resolve_device(device)
        self.amp = amp
        self.torch_threads = torch_threads
        self.entries: dict[str, ModelEntry] = {}
        self.loaded: dict[tuple[str, str], LoadedModel] = {}
        self.failures: dict[tuple[str, str], str] = {}

    def configure_thread(self) -> None:
        """Apply `torch_threads` to the calling thread: with OpenMP the intra-op thread count is per thread."""
        torch.set_num_threads(self.torch_threads)

    def load_all(self) -> None:
        """Read the repository, then verify, load and warm up every version. Blocking: call it in a thread."""
        self.configure_thread()
        self.entries = load_repository(self.root, require_weights=True)
        for name, entry in self.entries.items():
            for version in entry.versions:
                try:
                    self.loaded[(name, version)] = self._load(entry, version)
                except Exception as error:  # one bad model must not keep the others from serving
                    self.failures[(name, version)] = str(error)
                    log.error(
                        "model refused",
                        extra={"fields": {"model": name, "version": version, "reason": str(error)}},
                    )
                else:
                    log.info(
                        "model ready", extra={"fields": {"model": name, "version": version, "device": str(self.device)}}
                    )

    def _load(self, entry: ModelEntry, version: str) -> LoadedModel:
        config = entry.config
        unsupported = [spec.name for spec in config.served_inputs if spec.datatype not in TORCH_DTYPE]
        if unsupported:
            raise ValueError(f"inputs {unsupported} have datatypes torch cannot take")
        weights = entry.path / version / MODEL_FILE
        verify_checksum(weights)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream in favour of torch.export, yet it is the format we serve.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(weights), map_location=self.device)  # type: ignore[no-untyped-call]  # torch.jit is unannotated
        module.eval()
        model = LoadedModel(config=config, version=version, module=module, device=self.device, amp=self.amp)
        model.warm_up()
        return model

    def entry(self, name: str) -> ModelEntry:
        return find_model(self.entries, name)

    def ready_versions(self, name: str) -> list[str]:
        return [version for version in self.entry(name).versions if (name, version) in self.loaded]

    def resolve(self, name: str, version: str = "") -> str:
        """The version a request means: the one named, or the latest ready one. NotFound if unknown."""
        entry = self.entry(name)
        if version:
            return entry.resolve_version(version)
        ready = self.ready_versions(name)
        return ready[-1] if ready else entry.latest

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The ready model version; NotFound if unknown, FailedPrecondition if it was refused at load."""
        resolved = self.resolve(name, version)
        model = self.loaded.get((name, resolved))
        if model is None:
            raise FailedPrecondition(f"model '{name}' version '{resolved}' is not ready")
        return model

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except (NotFound, FailedPrecondition):
            return False
        return True
