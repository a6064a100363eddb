"""`python -m demo.setup --out DIR`: feature view registry and the trained model repository for the demo.

Writes DIR/feature_views.json and DIR/model_repository/{fraud,fraud_large,bench_mlp} (fraud: versions 1 and 2,
its config serving 1). Feature rows are seeded into
Redis when the mesh starts (the Redis is private to each run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def prepare(out: Path) -> None:
    from demo.seed import write_demo_views
    from demo.train import train_demo_fraud_models, write_bench_model

    out.mkdir(parents=True, exist_ok=True)
    write_demo_views(out / "feature_views.json")
    repository = out / "model_repository"
    train_demo_fraud_models(repository)
    write_bench_model(repository)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".run/demo"))
    args = parser.parse_args()
    started = time.perf_counter()
    prepare(args.out)
    print(f"demo data and models ready in {args.out} ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
