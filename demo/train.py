"""Train the demo `fraud` models (versions 1 and 2, and the larger `fraud_large`) on synthetic transactions and
write the model repository.

Each model is exported as TorchScript (`<repo>/<model>/<version>/model.pt`, with a `model.pt.sha256`
sidecar) next to its `<repo>/<model>/config.json`, which pins each version's SHA-256 (`version_digests`): the
model service serves only weights that match their pin. Also writes `bench_mlp`,
a compute-bound model with random weights for batching benchmarks.

    python -m demo.train --repo .run/demo/model_repository
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demo.synthetic import MERCHANT_FEATURES, USER_FEATURES, feature_matrix, make_world, sample_transactions
from infermesh.drift import PROFILE_FILE, Profile, build_profile
from infermesh.model_config import (
    CONFIG_FILE,
    DIGEST_PREFIX,
    MODEL_FILE,
    ModelConfig,
    file_sha256,
    pin_version,
    version_folders,
)

FRAUD_OUTPUT = "fraud_probability"
FEATURE_NAMES = [*USER_FEATURES, *MERCHANT_FEATURES, "amount"]
# Counts, amounts and ages are heavy-tailed: the model sees log1p of them (rates and ratios stay as they are).
LOG_FEATURES = {
    "txn_count_1h",
    "txn_count_24h",
    "avg_amount_7d",
    "account_age_days",
    "distinct_merchants_24h",
    "failed_logins_24h",
    "avg_ticket",
    "txn_volume_24h",
    "merchant_age_days",
    "amount",
}
TRAIN_ROWS = 200_000
HOLDOUT_ROWS = 50_000
EPOCHS = 4
BATCH_ROWS = 512
BENCH_WIDTH = 256
BENCH_HIDDEN = 2048


class FraudNet(nn.Module):
    """13 features → fraud probability. Log transform and standardisation are buffers of the module."""

    def __init__(
        self, log_mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, hidden: tuple[int, int] = (32, 16)
    ) -> None:
        super().__init__()
        self.register_buffer("log_mask", log_mask)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        first, second = hidden
        self.net = nn.Sequential(
            nn.Linear(len(FEATURE_NAMES), first), nn.ReLU(), nn.Linear(first, second), nn.ReLU(), nn.Linear(second, 1)
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(self.log_mask, torch.log1p(torch.clamp(x, min=0.0)), x)
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 13] FP32 → [N, 1] probability."""
        return torch.sigmoid(self.logits(x))


class BenchMLP(nn.Module):
    def __init__(self, width: int = BENCH_WIDTH, hidden: int = BENCH_HIDDEN) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged)."""
    labels = labels.astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded torch (bitwise reproducible on CPU); restores the thread count after."""
    threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_torchscript(module: nn.Module, path: Path) -> Path:
    """Script `module`, save it to `path` and write `<path>.sha256`; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export; it is still the format we serve.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    if (path.parent.parent / CONFIG_FILE).is_file():  # the model's config exists: pin the version in it
        pin_version(path.parent.parent, path.parent.name, digest)
    return path


def write_config(repo: Path, config: dict[str, object]) -> Path:
    """Validate against infermesh.model_config and write `<repo>/<name>/config.json`, pinning the digest of every
    version whose weights are there already (save_torchscript pins those written later)."""
    folder = repo / str(config["name"])
    pins = {version: DIGEST_PREFIX + file_sha256(folder / version / MODEL_FILE) for version in version_folders(folder)}
    given = config.get("version_digests")
    config = {**config, "version_digests": {**pins, **(given if isinstance(given, dict) else {})}}
    ModelConfig.model_validate(config)
    path = folder / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def fraud_config(name: str = "fraud") -> dict[str, object]:
    return {
        "name": name,
        "platform": "pytorch_torchscript",
        "max_batch_size": 1024,
        "dynamic_batching": {"max_queue_delay_us": 0, "max_queue_size": 2048},
        "inputs": [
            {"name": "user_id", "datatype": "BYTES", "shape": [-1]},
            {"name": "merchant_id", "datatype": "BYTES", "shape": [-1]},
            {"name": "amount", "datatype": "FP32", "shape": [-1]},
        ],
        "outputs": [{"name": FRAUD_OUTPUT, "datatype": "FP32", "shape": [-1]}],
        "feature_spec": {
            "entities": [
                {"input": "user_id", "view": "user", "features": list(USER_FEATURES)},
                {"input": "merchant_id", "view": "merchant", "features": list(MERCHANT_FEATURES)},
            ],
            "request_inputs": ["amount"],
            "on_missing": "default",
        },
        "model_input": {"name": "features", "datatype": "FP32", "shape": [-1, len(FEATURE_NAMES)]},
    }


# The demo's fraud models: version 1 is served; version 2 (another seed and sample, wider) is the candidate for a
# canary or a shadow; `fraud_large` is the larger model the cascade hands unsure answers to.
FRAUD_VERSIONS = {"1": (0, (32, 16)), "2": (1, (48, 24))}
FRAUD_LARGE_HIDDEN = (128, 64)


def train_fraud(seed: int = 0, hidden: tuple[int, int] = (32, 16)) -> tuple[FraudNet, float, float, Profile]:
    """Train on the demo world (the one the feature store is seeded with); returns (model, held-out AUC, seconds,
    the baseline profile: the training features' histograms and the model's predictions on them)."""
    started = time.perf_counter()
    world = make_world()
    train = sample_transactions(world, TRAIN_ROWS, seed=1_000 + seed)
    holdout = sample_transactions(world, HOLDOUT_ROWS, seed=2_000 + seed)
    x_train = torch.from_numpy(feature_matrix(world, train.user_index, train.merchant_index, train.amount))
    y_train = torch.from_numpy(train.label.astype(np.float32)).unsqueeze(1)
    x_holdout = torch.from_numpy(feature_matrix(world, holdout.user_index, holdout.merchant_index, holdout.amount))
    with _deterministic(seed):
        log_mask = torch.tensor([name in LOG_FEATURES for name in FEATURE_NAMES])
        transformed = torch.where(log_mask, torch.log1p(torch.clamp(x_train, min=0.0)), x_train)
        mean = transformed.mean(dim=0)
        std = transformed.std(dim=0).clamp(min=1e-6)
        model = FraudNet(log_mask, mean, std, hidden)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(x_train), generator=generator).split(BATCH_ROWS):
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(model.logits(x_train[batch]), y_train[batch])
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.inference_mode():
            scores = model(x_holdout).squeeze(1).numpy()
            trained_scores = model(x_train).squeeze(1).numpy()
    columns = x_train.numpy()
    profile = build_profile(
        {name: columns[:, i] for i, name in enumerate(FEATURE_NAMES)},
        {FRAUD_OUTPUT: trained_scores},
        prediction=FRAUD_OUTPUT,
    )
    return model, roc_auc(holdout.label, scores), time.perf_counter() - started, profile


def train_fraud_model(
    repo: Path, version: str = "1", seed: int = 0, hidden: tuple[int, int] = (32, 16), name: str = "fraud"
) -> Path:
    """Train a fraud model, write `<repo>/<name>/<version>/model.pt` (+ .sha256, training.json, profile.json: the
    baseline the router measures drift against) and its config.

    Returns the path of model.pt; the held-out AUC is in `training.json` next to it.
    """
    model, auc, seconds, profile = train_fraud(seed, hidden)
    path = save_torchscript(model, repo / name / version / MODEL_FILE)
    (path.parent / PROFILE_FILE).write_text(profile.to_json() + "\n")
    summary = {
        "auc": round(auc, 4),
        "train_rows": TRAIN_ROWS,
        "holdout_rows": HOLDOUT_ROWS,
        "seconds": round(seconds, 2),
        "seed": seed,
        "hidden": list(hidden),
    }
    (path.parent / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_config(repo, fraud_config(name))
    return path


DEMO_LOG_SAMPLE_RATE = 1.0  # the demo `fraud` model's monitoring.log_sample_rate


def train_demo_fraud_models(repo: Path) -> list[Path]:
    """`fraud` versions 1 and 2 and `fraud_large` (its config serves version 1 until a rollout names 2)."""
    paths = [train_fraud_model(repo, version, seed, hidden) for version, (seed, hidden) in FRAUD_VERSIONS.items()]
    config = fraud_config()
    config["version_policy"] = {"specific": {"versions": [1]}}
    # Opted in to the prediction log: a router given one (make run, compose, Kubernetes) logs every answer, so each
    # labelled transaction can be joined (make replay --gateway). Sample less under real traffic.
    config["monitoring"] = {"log_sample_rate": DEMO_LOG_SAMPLE_RATE}
    write_config(repo, config)
    paths.append(train_fraud_model(repo, "1", 2, FRAUD_LARGE_HIDDEN, name="fraud_large"))
    return paths


def bench_config() -> dict[str, object]:
    return {
        "name": "bench_mlp",
        "platform": "pytorch_torchscript",
        "max_batch_size": 256,
        "dynamic_batching": {"max_queue_delay_us": 1000, "max_queue_size": 1024},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, BENCH_WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, BENCH_WIDTH]}],
    }


def write_bench_model(repo: Path, version: str = "1", seed: int = 0) -> Path:
    """`bench_mlp`: 256 → 2048 → 2048 → 256 with random (seeded) weights; returns the path of model.pt."""
    with _deterministic(seed):
        model = BenchMLP()
    path = save_torchscript(model, repo / "bench_mlp" / version / MODEL_FILE)
    write_config(repo, bench_config())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="Model repository folder to write.")
    args = parser.parse_args()
    started = time.perf_counter()
    for fraud in train_demo_fraud_models(args.repo):
        summary = json.loads((fraud.parent / "training.json").read_text())
        print(f"{fraud.parent.parent.name}: held-out AUC {summary['auc']:.4f}, trained in {summary['seconds']:.1f}s")
    bench = write_bench_model(args.repo)
    print(f"bench_mlp → {bench}")
    print(f"done in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
