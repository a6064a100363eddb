"""Demo feature views and data: the synthetic world's users and merchants written to Redis.

`python -m demo.seed --redis-url URL --views PATH` writes the views file, then seeds every entity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from demo import synthetic
from feature_service.settings import FeatureServiceSettings
from feature_service.store import FeatureStore
from feature_service.views import load_views

SEED_BATCH_ROWS = 2_000  # rows per write call: one pipelined round trip each


def demo_views() -> dict[str, object]:
    def features(spec: dict[str, tuple[float, str]]) -> list[dict[str, object]]:
        return [{"name": name, "default": default, "description": text} for name, (default, text) in spec.items()]

    return {
        "views": [
            {
                "name": "user",
                "entity_key": "user_id",
                "max_age_ms": synthetic.USER_MAX_AGE_MS,
                "features": features(synthetic.USER_FEATURES),
            },
            {
                "name": "merchant",
                "entity_key": "merchant_id",
                "max_age_ms": synthetic.MERCHANT_MAX_AGE_MS,
                "features": features(synthetic.MERCHANT_FEATURES),
            },
        ]
    }


def write_demo_views(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(demo_views(), indent=2) + "\n")
    temporary.replace(path)  # atomic: a service starting meanwhile never reads half a file


def _rows(
    ids: list[str], names: list[str], matrix: np.ndarray, event_time_ms: int
) -> list[tuple[str, dict[str, float], int]]:
    return [
        (entity_id, dict(zip(names, row, strict=True)), event_time_ms)
        for entity_id, row in zip(ids, matrix.tolist(), strict=True)
    ]


async def seed_demo_features(
    redis_url: str, views_path: Path, now_ms: int | None = None, *, key_prefix: str = "im"
) -> dict[str, int]:
    """Write users u0…u{N-1} and merchants m0…m{M-1} with event time `now_ms`; returns rows written per view."""
    event_time_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    world = synthetic.make_world()
    tables = {
        "user": ([synthetic.user_id(i) for i in range(len(world.users))], list(synthetic.USER_FEATURES), world.users),
        "merchant": (
            [synthetic.merchant_id(i) for i in range(len(world.merchants))],
            list(synthetic.MERCHANT_FEATURES),
            world.merchants,
        ),
    }
    store = await FeatureStore.open(redis_url, load_views(views_path), key_prefix=key_prefix)
    written: dict[str, int] = {}
    try:
        await store.load_scripts()
        for view, (ids, names, matrix) in tables.items():
            rows = _rows(ids, names, matrix, event_time_ms)
            written[view] = 0
            for start in range(0, len(rows), SEED_BATCH_ROWS):
                result = await store.write(view, rows[start : start + SEED_BATCH_ROWS])
                written[view] += result.written
    finally:
        await store.aclose()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True, help="Redis to seed, e.g. redis://127.0.0.1:6380/0")
    parser.add_argument("--views", type=Path, required=True, help="Feature views JSON file to (re)write")
    parser.add_argument("--key-prefix", default="im", help="The feature service's FEATURE_SERVICE_KEY_PREFIX")
    parser.add_argument("--username", default="", help="Redis ACL user (as FEATURE_SERVICE_REDIS_USERNAME)")
    parser.add_argument("--password-file", type=Path, help="File holding the Redis password")
    parser.add_argument("--ca-file", type=Path, help="CA of Redis's certificate (rediss://)")
    args = parser.parse_args()
    # The feature service's own rules for credentials and TLS: what works for it works here.
    url = FeatureServiceSettings(
        redis_url=args.redis_url,
        redis_username=args.username,
        redis_password_file=args.password_file,
        redis_ca_file=args.ca_file,
    ).redis_connection_url()
    write_demo_views(args.views)
    started = time.perf_counter()
    written = asyncio.run(seed_demo_features(url, args.views, key_prefix=args.key_prefix))
    print(json.dumps({"written": written, "seconds": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main()
