"""`python -m demo.key_guard KEYS_FILE`: refuse (exit 1) a gateway key file that holds the published demo key.

The compose demo ships `deploy/compose/api_keys.demo.json`, the hash of `im_demo_change_me`: a key printed in this
repository, known to anyone who read it. docker-compose.yml runs this check before the gateway starts, so a
deployment serves with that key only when asked to (`INFERMESH_ALLOW_DEMO_KEY=1`); otherwise it points
`INFERMESH_API_KEYS_FILE` at its own key file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gateway.auth import hash_key

PUBLISHED_DEMO_KEY = "im_demo_change_me"
ALLOW_ENV = "INFERMESH_ALLOW_DEMO_KEY"


def holds_demo_key(path: Path) -> bool:
    document = json.loads(path.read_text())
    keys = document.get("keys", []) if isinstance(document, dict) else []
    demo = hash_key(PUBLISHED_DEMO_KEY)
    return any(isinstance(entry, dict) and entry.get("sha256") == demo for entry in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys_file", type=Path, help="the gateway's API key file (GATEWAY_API_KEYS_PATH)")
    args = parser.parse_args(argv)
    try:
        published = holds_demo_key(args.keys_file)
    except (OSError, ValueError) as error:
        print(f"key guard: cannot read {args.keys_file}: {type(error).__name__}", file=sys.stderr)
        return 1
    if not published:
        return 0
    if os.environ.get(ALLOW_ENV) == "1":
        print(f"key guard: the published demo key is accepted ({ALLOW_ENV}=1): a demo, not a deployment")
        return 0
    print(
        f"key guard: {args.keys_file} holds the published demo key '{PUBLISHED_DEMO_KEY}', which anyone can read in "
        f"the repository. Point INFERMESH_API_KEYS_FILE at your own key file, or set {ALLOW_ENV}=1 for a demo.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
