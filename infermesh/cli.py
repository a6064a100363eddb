"""`infermesh`: the command line for the people who run the mesh.

`infermesh features get|ingest` inspect an entity's stored features and load CSV or Parquet files into a feature
view, through the feature service's internal API (infermesh.feature_cli).

`infermesh models list|load|unload|stats` call a gateway's model repository and statistics extensions of the
Open Inference Protocol (the calls tritonclient's `get_model_repository_index`, `load_model`, `unload_model`
and `get_inference_statistics` make); `infermesh models publish` writes a new TorchScript version into a model
repository folder, complete or not at all, for the model services to pick up. `infermesh rollout
show|canary|shadow|cascade|promote|off` change a model's `traffic` section (canary with its guard, shadows,
cascade) through the same load with a config override that tritonclient's `load_model(config=...)` sends.

The API key comes from $INFERMESH_API_KEY only, and `features ingest`'s write token from
$INFERMESH_FEATURE_WRITE_TOKEN only: an option would show in `ps` and in the shell's history.
Exit codes: 0 done; 1 refused (by the server, or a publish that would overwrite or write junk); 2 usage;
3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format

from infermesh import feature_cli
from infermesh.model_config import CONFIG_FILE, MESH_PARAMETER_PREFIX, MODEL_FILE, pin_version
from infermesh.proto import feature_store_pb2 as fpb
from infermesh.proto import feature_store_pb2_grpc as fpb_grpc
from infermesh.proto import inference_pb2 as pb
from infermesh.proto import inference_pb2_grpc as pb_grpc

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_FEATURE_URL = "127.0.0.1:8021"
FEATURE_URL_ENV = "INFERMESH_FEATURE_SERVICE_URL"
INGEST_TIMEOUT_S = 3600.0
DEFAULT_REPOSITORY = ".run/demo/model_repository"
URL_ENV = "INFERMESH_URL"
KEY_ENV = "INFERMESH_API_KEY"
WRITE_TOKEN_ENV = "INFERMESH_FEATURE_WRITE_TOKEN"
REPOSITORY_ENV = "INFERMESH_MODEL_REPOSITORY"
SLOW_TIMEOUT_S = 120.0  # load and unload wait for the model services to (un)load and warm up
TIMEOUT_S = 10.0

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
COPY_CHUNK = 1 << 20
# The integrity sidecar next to the weights, as model_service.registry checks it (not imported from there: it
# loads torch, which `infermesh models list` should not wait for).
CHECKSUM_SUFFIX = ".sha256"


class Refused(Exception):
    """An operation refused here (exit 1); the message says why."""


class Unreachable(Exception):
    """No connection to the server within the timeout (exit 3)."""


@dataclass(frozen=True)
class Target:
    """Where and how to call: address, overall deadline, transport security, credential."""

    url: str
    timeout_s: float
    tls: bool
    ca: bytes | None
    api_key: str
    client_certificate: tuple[bytes, bytes] | None = None  # (key, certificate chain) for mutual TLS


class Connection:
    """One channel to a server: connected on entry (fails fast as Unreachable), closed on exit. Every call
    shares the one deadline of the command."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._deadline = time.monotonic() + target.timeout_s
        if target.tls:
            key, chain = target.client_certificate or (None, None)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=target.ca, private_key=key, certificate_chain=chain
            )
            self._channel = grpc.secure_channel(target.url, credentials)
        else:
            self._channel = grpc.insecure_channel(target.url)

    def __enter__(self) -> Self:
        try:
            why = self._connect()
        except BaseException:
            self._channel.close()
            raise
        if why:
            self._channel.close()
            raise Unreachable(f"cannot reach {self.target.url} ({why})")
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def _connect(self) -> str:
        """Empty once the channel is READY; else why not. A refused connection, a failed name lookup or TLS
        handshake shows as TRANSIENT_FAILURE at once, so an absent server is reported without waiting."""
        settled = threading.Event()
        states: list[grpc.ChannelConnectivity] = []

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            if state in (
                grpc.ChannelConnectivity.READY,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                settled.set()

        self._channel.subscribe(watch, try_to_connect=True)
        try:
            if not settled.wait(self._remaining()):
                return f"no connection within {self.target.timeout_s:g}s"
        finally:
            self._channel.unsubscribe(watch)
        if grpc.ChannelConnectivity.READY in states:
            return ""
        return "connection or TLS handshake failed" if self.target.tls else "connection failed"

    def _remaining(self) -> float:
        return max(self._deadline - time.monotonic(), 0.001)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of every call: what is left of the deadline, and the credential."""
        metadata = [("authorization", f"Bearer {self.target.api_key}")] if self.target.api_key else []
        return {"timeout": self._remaining(), "metadata": metadata}


class Gateway(Connection):
    """A gateway's Open Inference Protocol API (with its repository and statistics extensions)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)


class FeatureService(Connection):
    """The feature service's internal API (protos/feature_store.proto)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.stub = fpb_grpc.FeatureStoreStub(self._channel)

    def view(self, name: str) -> fpb.FeatureView:
        response: fpb.ListFeatureViewsResponse = self.stub.ListFeatureViews(
            fpb.ListFeatureViewsRequest(), **self.options()
        )
        for view in response.views:
            if view.name == name:
                return view
        known = sorted(view.name for view in response.views)
        raise Refused(f"no feature view '{name}' (the feature service has {known})")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (sys.maxsize, version)


def _emit(as_json: bool, document: object, text: str) -> None:
    print(json.dumps(document, indent=2) if as_json else text)


# ---- models list / load / unload / stats --------------------------------------------------------------------


def list_models(gateway: Gateway, as_json: bool) -> None:
    request = pb.RepositoryIndexRequest()  # every version, whatever its state
    response: pb.RepositoryIndexResponse = gateway.stub.RepositoryIndex(request, **gateway.options())
    models = sorted(response.models, key=lambda m: (m.name, _version_key(m.version)))
    rows = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in models]
    table = [list(row.values()) for row in rows]
    _emit(as_json, rows, _table(["MODEL", "VERSION", "STATE", "REASON"], table) if rows else "no models")


def load_model(gateway: Gateway, model: str, config_text: str | None, as_json: bool, quiet: bool = False) -> None:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if config_text is not None:  # as tritonclient's load_model(config=...) sends it
        request.parameters["config"].string_param = config_text
    gateway.stub.RepositoryModelLoad(request, **gateway.options())
    if not quiet:
        _emit(as_json, {"model": model, "loaded": True}, f"loaded {model}")


def unload_model(gateway: Gateway, model: str, as_json: bool) -> None:
    gateway.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model), **gateway.options())
    _emit(as_json, {"model": model, "unloaded": True}, f"unloaded {model}")


TRAFFIC_PARAMETER = MESH_PARAMETER_PREFIX + "traffic"


def _config_in_force(gateway: Gateway, model: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's config as Triton shows it (JSON), less its traffic section; and that section, if any."""
    response = gateway.stub.ModelConfig(pb.ModelConfigRequest(name=model), **gateway.options())
    config: dict[str, Any] = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
    parameter = config.get("parameters", {}).pop(TRAFFIC_PARAMETER, None)
    traffic = json.loads(parameter["string_value"]) if parameter else None
    return config, traffic


def _baseline(gateway: Gateway, model: str, traffic: dict[str, Any] | None) -> str:
    """The version answering now: the traffic section's baseline, else the newest version served."""
    if traffic is not None:
        return str(traffic["baseline"])
    metadata = gateway.stub.ModelMetadata(pb.ModelMetadataRequest(name=model), **gateway.options())
    if not metadata.versions:
        raise Refused(f"model '{model}' serves no version to start a rollout from")
    return str(max(metadata.versions, key=_version_key))


def _apply_traffic(gateway: Gateway, model: str, config: dict[str, Any], traffic: dict[str, Any] | None) -> None:
    if traffic is not None:
        config["traffic"] = traffic
    load_model(gateway, model, json.dumps(config), as_json=False, quiet=True)


def rollout(gateway: Gateway, args: argparse.Namespace) -> None:
    """Change `args.model`'s traffic section as `args.command` says; print the section in force afterwards."""
    model: str = args.model
    command: str = args.command
    config, traffic = _config_in_force(gateway, model)
    if command == "show":
        index = gateway.stub.RepositoryIndex(pb.RepositoryIndexRequest(), **gateway.options())
        versions = [
            {"version": m.version, "state": m.state, "reason": m.reason} for m in index.models if m.name == model
        ]
        document = {"model": model, "traffic": traffic, "versions": versions}
        rows = [[v["version"], v["state"], v["reason"]] for v in versions]
        text = json.dumps(traffic, indent=2) if traffic is not None else "no traffic section: the version policy rules"
        _emit(args.json, document, text + "\n" + _table(["VERSION", "STATE", "REASON"], rows))
        return
    if command == "off":
        _apply_traffic(gateway, model, config, None)
        _emit(args.json, {"model": model, "traffic": None}, f"{model}: no traffic section (the version policy rules)")
        return
    baseline = _baseline(gateway, model, traffic)
    changed: dict[str, Any] = dict(traffic) if traffic is not None else {"baseline": baseline}
    if command == "canary":
        version: str = args.version
        if version == baseline:
            raise Refused(f"version {version} is the baseline; a canary is another version")
        if not 0 <= args.weight <= 100:
            raise Refused("--weight is a percentage: 0 to 100")
        changed["split"] = {baseline: 100 - args.weight, version: args.weight}
        changed["shadow"] = [v for v in changed.get("shadow", []) if v != version]
        changed["rolled_back"] = {}
        if args.sticky:
            changed["sticky_input"] = args.sticky
        if args.no_guard:
            changed.pop("guard", None)
        else:
            changed["guard"] = {
                "window_s": args.window_s,
                "min_requests": args.min_requests,
                "max_error_ratio": args.max_error_ratio,
                "max_p99_ms": args.max_p99_ms,
                "max_divergence": args.max_divergence,
            }
    elif command == "shadow":
        changed["shadow"] = list(args.versions)
        changed["shadow_sample"] = args.sample
    elif command == "cascade":
        low, high = args.between
        changed["cascade"] = {"model": args.large_model, "when_output_between": [low, high], "output": args.output}
    elif command == "promote":
        changed["baseline"] = args.version
        changed["split"] = {args.version: 100}
        changed["shadow"] = [v for v in changed.get("shadow", []) if v != args.version]
        changed["rolled_back"] = {}
    _apply_traffic(gateway, model, config, changed)
    _emit(args.json, {"model": model, "traffic": changed}, f"{model}: " + json.dumps(changed))


def _mean_ms(duration: pb.StatisticDuration) -> float | None:
    return round(duration.ns / duration.count / 1e6, 3) if duration.count else None


def _last_inference(ms_since_epoch: int) -> str | None:
    if not ms_since_epoch:
        return None
    return datetime.fromtimestamp(ms_since_epoch / 1000, tz=UTC).isoformat(timespec="milliseconds")


def model_stats(gateway: Gateway, model: str, version: str, as_json: bool) -> None:
    request = pb.ModelStatisticsRequest(name=model, version=version)
    response: pb.ModelStatisticsResponse = gateway.stub.ModelStatistics(request, **gateway.options())
    rows: list[dict[str, Any]] = []
    for s in sorted(response.model_stats, key=lambda s: (s.name, _version_key(s.version))):
        stats = s.inference_stats
        rows.append(
            {
                "name": s.name,
                "version": s.version,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "success_count": stats.success.count,
                "success_mean_ms": _mean_ms(stats.success),
                "fail_count": stats.fail.count,
                "queue_mean_ms": _mean_ms(stats.queue),
                "compute_infer_mean_ms": _mean_ms(stats.compute_infer),
                "last_inference": _last_inference(s.last_inference),
            }
        )
    header = ["MODEL", "VERSION", "INFERENCES", "EXECUTIONS", "SUCCESS", "SUCCESS_MS", "FAIL", "QUEUE_MS"]
    header += ["INFER_MS", "LAST_INFERENCE"]
    table = [["-" if value is None else str(value) for value in row.values()] for row in rows]
    for line in table:
        line[-1] = "never" if line[-1] == "-" else line[-1]
    _emit(as_json, rows, _table(header, table) if rows else "no statistics")


# ---- models publish -----------------------------------------------------------------------------------------


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _copy_hashing(source: Path, target: Path) -> tuple[str, int]:
    """Copy `source` to `target`, durably; the SHA-256 and size of exactly the bytes written."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest(), size


def _check_torchscript(path: Path, shown_as: Path) -> None:
    import torch  # only publish needs it, and it takes seconds to import

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice is not the user's concern
            torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]  # torch.jit is unannotated
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Refused(f"{shown_as} is not a loadable TorchScript archive: {first_line}") from None


def publish(repository: Path, model: str, version: str, source: Path, as_json: bool) -> None:
    """Write `source` as `<repository>/<model>/<version>/model.pt` plus its `.sha256`: assembled in a hidden
    folder next to the versions, checked as the model service will check it, pinned in the model's config.json
    (`version_digests`, outside the version folder: the model service serves only bytes that match it), and
    renamed into place in one step, so a model service scanning the repository sees the version complete, and
    pinned, or not at all."""
    model_dir = repository / model
    if not (model_dir / CONFIG_FILE).is_file():
        raise Refused(f"no model '{model}' in {repository}: {model_dir / CONFIG_FILE} does not exist")
    final = model_dir / version
    if final.exists():
        raise Refused(f"version {version} of {model} exists ({final}); publish a new version number")
    if not source.is_file():
        raise Refused(f"{source} is not a file")
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        weights = staging / MODEL_FILE
        sha256, size = _copy_hashing(source, weights)
        _check_torchscript(weights, shown_as=source)  # the very bytes that will be served
        sidecar = staging / (MODEL_FILE + CHECKSUM_SUFFIX)
        with sidecar.open("x") as stream:
            stream.write(f"{sha256}  {MODEL_FILE}\n")
            stream.flush()
            os.fsync(stream.fileno())
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a service running as another user
        _fsync_folder(staging)
        if final.exists():  # someone else published it meanwhile
            raise Refused(f"version {version} of {model} exists ({final}); publish a new version number")
        try:
            pin_version(model_dir, version, sha256)
        except ValueError as error:  # config.json is not a JSON object (invalid JSON is a ValueError too)
            raise Refused(f"cannot pin the version in {model_dir / CONFIG_FILE}: {error}") from None
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(model_dir)
    document = {
        "model": model,
        "version": version,
        "path": str(final / MODEL_FILE),
        "bytes": size,
        "sha256": sha256,
    }
    text = (
        f"published {model} version {version}\n"
        f"  {final / MODEL_FILE} ({size} bytes)\n"
        f"  {final / (MODEL_FILE + CHECKSUM_SUFFIX)} (sha256 {sha256})\n"
        f"  pinned in {model_dir / CONFIG_FILE} (version_digests)\n"
        f"to serve it: infermesh models load {model}"
    )
    _emit(as_json, document, text)


# ---- features get / ingest ---------------------------------------------------------------------------------


def get_features(service: FeatureService, view_name: str, entity_id: str, as_json: bool) -> None:
    view = service.view(view_name)
    request = fpb.ReadFeaturesRequest(feature_view=view_name, entity_ids=[entity_id])
    response: fpb.ReadFeaturesResponse = service.stub.ReadFeatures(request, **service.options())
    document, text = feature_cli.describe_entity(view, entity_id, response, time.time_ns() // 1_000_000)
    _emit(as_json, document, text)
    if not document["found"]:
        raise Refused(f"entity {view.entity_key}={entity_id} has no features in view {view_name}")


def ingest_features(service: FeatureService, view_name: str, path: Path, batch_rows: int, as_json: bool) -> None:
    view = service.view(view_name)
    options = service.options()
    try:
        summary = feature_cli.ingest(service.stub, view, path, batch_rows, options["timeout"], options["metadata"])
    except feature_cli.SchemaError as error:
        raise Refused(str(error)) from None
    _emit(as_json, summary.as_dict(), feature_cli.format_summary(view_name, path, summary))
    if summary.rejected:
        raise Refused(f"{summary.rejected} rows rejected (the rest are written)")


# ---- arguments ----------------------------------------------------------------------------------------------


def _version(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*", text):
        raise argparse.ArgumentTypeError(f"must be a positive integer such as 2 (got {text!r})")
    return text


def _model_name(text: str) -> str:
    if not text or text.startswith(".") or "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a model name: {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection (the API key comes from $INFERMESH_API_KEY)")
    group.add_argument(
        "--url", default=os.environ.get(URL_ENV) or DEFAULT_URL, help=f"gateway address (${URL_ENV}, else %(default)s)"
    )
    group.add_argument(
        "--timeout", type=float, default=None, help="seconds for the whole command (120 for load/unload, else 10)"
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    group.add_argument("--ca", type=Path, help="PEM file of the root certificates to trust (implies --tls)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(prog="infermesh", description="Manage the models an infermesh gateway serves.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    models = groups.add_parser("models", help="list, load, unload, inspect and publish models")
    commands = models.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[connection, output], help="every model version, its state and why")
    load = commands.add_parser("load", parents=[connection, output], help="load (or reload) a model")
    load.add_argument("model", metavar="MODEL", type=_model_name)
    load.add_argument("--config", type=Path, metavar="FILE", help="a full model config (JSON) to apply")
    unload = commands.add_parser("unload", parents=[connection, output], help="unload a model")
    unload.add_argument("model", metavar="MODEL", type=_model_name)
    stats = commands.add_parser("stats", parents=[connection, output], help="inference statistics")
    stats.add_argument("model", metavar="MODEL", nargs="?", default="", help="one model (default: all)")
    stats.add_argument("--version", default="", metavar="V", help="one version of MODEL")
    publish = commands.add_parser(
        "publish", parents=[output], help="write a TorchScript file into the repository as a new version"
    )
    publish.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get(REPOSITORY_ENV) or DEFAULT_REPOSITORY),
        metavar="DIR",
        help=f"the model repository (${REPOSITORY_ENV}, else %(default)s)",
    )
    publish.add_argument("model", metavar="MODEL", type=_model_name)
    publish.add_argument("version", metavar="VERSION", type=_version)
    publish.add_argument("file", metavar="FILE", type=Path, help="a TorchScript archive (torch.jit.save)")
    rollouts = groups.add_parser("rollout", help="canaries, shadows and cascades: a model's traffic section")
    steps = rollouts.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = steps.add_parser("show", parents=[connection, output], help="the traffic section and each version's state")
    show.add_argument("model", metavar="MODEL", type=_model_name)
    canary = steps.add_parser(
        "canary", parents=[connection, output], help="send a share of the traffic to VERSION, guarded"
    )
    canary.add_argument("model", metavar="MODEL", type=_model_name)
    canary.add_argument("version", metavar="VERSION", type=_version)
    canary.add_argument("--weight", type=int, default=10, help="percent of the traffic (default %(default)s)")
    canary.add_argument("--sticky", metavar="INPUT", default="", help="one version per value of this input")
    guard = canary.add_argument_group("guard (automatic rollback)")
    guard.add_argument("--window-s", type=float, default=30.0, help="window of the figures (default %(default)s)")
    guard.add_argument("--min-requests", type=int, default=50, help="before any verdict (default %(default)s)")
    guard.add_argument("--max-error-ratio", type=float, default=0.01, help="default %(default)s")
    guard.add_argument("--max-p99-ms", type=float, default=None, help="p99 latency limit (default: none)")
    guard.add_argument("--max-divergence", type=float, default=None, help="mean |Δ| from the baseline (default: none)")
    guard.add_argument("--no-guard", action="store_true", help="no automatic rollback")
    shadow = steps.add_parser("shadow", parents=[connection, output], help="mirror the traffic to VERSIONs")
    shadow.add_argument("model", metavar="MODEL", type=_model_name)
    shadow.add_argument("versions", metavar="VERSION", type=_version, nargs="*", help="none: stop shadowing")
    shadow.add_argument("--sample", type=float, default=1.0, help="share of the traffic mirrored (default 1)")
    cascade = steps.add_parser(
        "cascade", parents=[connection, output], help="answers inside a band go to a larger model"
    )
    cascade.add_argument("model", metavar="MODEL", type=_model_name)
    cascade.add_argument("large_model", metavar="LARGE_MODEL", type=_model_name)
    cascade.add_argument("--between", type=float, nargs=2, metavar=("LOW", "HIGH"), required=True)
    cascade.add_argument("--output", default="", help="the output the band applies to (default: the first)")
    promote = steps.add_parser("promote", parents=[connection, output], help="make VERSION the baseline, all traffic")
    promote.add_argument("model", metavar="MODEL", type=_model_name)
    promote.add_argument("version", metavar="VERSION", type=_version)
    off = steps.add_parser("off", parents=[connection, output], help="drop the traffic section")
    off.add_argument("model", metavar="MODEL", type=_model_name)
    feature_connection = argparse.ArgumentParser(add_help=False)
    feature_group = feature_connection.add_argument_group("connection")
    feature_group.add_argument(
        "--url",
        default=os.environ.get(FEATURE_URL_ENV) or DEFAULT_FEATURE_URL,
        help=f"feature service address (${FEATURE_URL_ENV}, else %(default)s; make run prints it)",
    )
    feature_group.add_argument(
        "--timeout", type=float, default=None, help=f"seconds for the whole command ({INGEST_TIMEOUT_S:g} for ingest)"
    )
    feature_group.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    feature_group.add_argument("--ca", type=Path, help="PEM file of the root certificates to trust (implies --tls)")
    feature_group.add_argument(
        "--cert", type=Path, help="PEM client certificate, for a feature service that demands one (mutual TLS)"
    )
    feature_group.add_argument("--key", type=Path, help="PEM private key of --cert")
    features = groups.add_parser("features", help="inspect stored features, ingest files into a feature view")
    feature_commands = features.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get = feature_commands.add_parser(
        "get", parents=[feature_connection, output], help="one entity's feature vector, event time and age"
    )
    get.add_argument("view", metavar="VIEW")
    get.add_argument("entity", metavar="ENTITY", help="the entity id (e.g. u42)")
    ingest = feature_commands.add_parser(
        "ingest",
        parents=[feature_connection, output],
        help="upsert the rows of a CSV or Parquet file into a view (newest event wins; safe to re-run)",
    )
    ingest.add_argument("view", metavar="VIEW")
    ingest.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="columns: the view's entity key, event_time_ms (epoch ms) or event_time (timestamp), features",
    )
    ingest.add_argument(
        "--batch-rows",
        type=int,
        default=feature_cli.DEFAULT_BATCH_ROWS,
        metavar="N",
        help="rows per write (default %(default)s)",
    )
    for command in (listing, load, unload, stats, publish, show, canary, shadow, cascade, promote, off, get, ingest):
        command.set_defaults(command_parser=command)  # usage errors found later show the command's usage
    return parser


def _read_config(parser: argparse.ArgumentParser, path: Path) -> str:
    """The config file's text, checked to be a JSON object before anything is sent."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--config {path}: cannot read it: {error}")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--config {path}: not valid JSON: {error}")
    if not isinstance(document, dict):
        parser.error(f"--config {path}: a model config is a JSON object, not {type(document).__name__}")
    return text


def _target(parser: argparse.ArgumentParser, args: argparse.Namespace, slow: bool, default_s: float = 0.0) -> Target:
    timeout_s = default_s or (SLOW_TIMEOUT_S if slow else TIMEOUT_S)
    if args.timeout is not None:
        timeout_s = args.timeout
    if timeout_s <= 0:
        parser.error("--timeout must be positive")
    ca = None
    if args.ca is not None:
        try:
            ca = args.ca.read_bytes()
        except OSError as error:
            parser.error(f"--ca {args.ca}: cannot read it: {error}")
    return Target(args.url, timeout_s, args.tls or ca is not None, ca, os.environ.get(KEY_ENV, "").strip())


def _hint(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not os.environ.get(KEY_ENV, "").strip():
            return f"hint: set {KEY_ENV} to an API key (make run prints an admin key)"
        return f"hint: the key in {KEY_ENV} is not accepted; check it"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"hint: the key in {KEY_ENV} may not do this; managing models needs an admin key"
    return ""


def _feature_hint(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not os.environ.get(WRITE_TOKEN_ENV, "").strip():
            return (
                f"hint: set {WRITE_TOKEN_ENV} to a write token (make run writes one to .run/mesh/feature_write_token)"
            )
        return f"hint: the token in {WRITE_TOKEN_ENV} is not accepted by this feature service"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "hint: the feature service accepts no writes from this caller (see its writer settings)"
    return ""


@contextlib.contextmanager
def _reported(hint: Callable[[grpc.StatusCode], str] = _hint) -> Iterator[list[int]]:
    """Turns the ways a command fails into a message on stderr and an exit code (no traceback)."""
    code = [EXIT_OK]
    try:
        yield code
    except Unreachable as error:
        print(f"error: {error}", file=sys.stderr)
        code[0] = EXIT_UNREACHABLE
    except Refused as error:
        print(f"error: {error}", file=sys.stderr)
        code[0] = EXIT_REFUSED
    except grpc.RpcError as error:
        status = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        print(f"error: {status.name}: {details}", file=sys.stderr)
        if hint_text := hint(status):
            print(hint_text, file=sys.stderr)
        code[0] = EXIT_REFUSED
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        code[0] = EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser
    as_json: bool = args.json
    command: str = args.command
    if args.group == "features":
        return _features_main(parser, args)
    if command == "stats" and args.version and not args.model:
        parser.error("--version needs a MODEL")
    config_text = _read_config(parser, args.config) if command == "load" and args.config is not None else None
    actions: dict[str, Callable[[Gateway], None]] = {
        "list": lambda gateway: list_models(gateway, as_json),
        "load": lambda gateway: load_model(gateway, args.model, config_text, as_json),
        "unload": lambda gateway: unload_model(gateway, args.model, as_json),
        "stats": lambda gateway: model_stats(gateway, args.model, args.version, as_json),
    }
    if args.group == "rollout":
        actions = {command: lambda gateway: rollout(gateway, args)}
    try:
        with _reported() as code:
            if command == "publish":
                publish(args.repository, args.model, args.version, args.file, as_json)
            else:
                target = _target(parser, args, slow=command in ("load", "unload") or args.group == "rollout")
                with Gateway(target) as gateway:
                    actions[command](gateway)
    except KeyboardInterrupt:
        return 130
    return code[0]


def _features_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "ingest" and args.batch_rows < 1:
        parser.error("--batch-rows must be at least 1")
    target = _target(parser, args, slow=False, default_s=INGEST_TIMEOUT_S if args.command == "ingest" else 0.0)
    # The internal API takes no API key; a write (ingest) carries the write token, a read nothing.
    token = os.environ.get(WRITE_TOKEN_ENV, "").strip() if args.command == "ingest" else ""
    client_certificate = None
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.cert is not None:
        try:
            client_certificate = (args.key.read_bytes(), args.cert.read_bytes())
        except OSError as error:
            parser.error(f"--cert/--key: cannot read them: {error.strerror}")
    tls = target.tls or client_certificate is not None
    target = Target(target.url, target.timeout_s, tls, target.ca, token, client_certificate)
    try:
        with _reported(_feature_hint) as code, FeatureService(target) as service:
            if args.command == "get":
                get_features(service, args.view, args.entity, args.json)
            else:
                ingest_features(service, args.view, args.file, args.batch_rows, args.json)
    except KeyboardInterrupt:
        return 130
    return code[0]


if __name__ == "__main__":
    raise SystemExit(main())
