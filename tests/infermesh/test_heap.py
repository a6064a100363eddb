"""infermesh.heap: large message buffers are reused from the heap instead of mapped afresh per message."""

from __future__ import annotations

import subprocess
import sys

import pytest

MESSAGE_BYTES = 16 * 1024 * 1024

# Two 16 MiB buffers alive at once (as gRPC's received slices and the message joined from them), freed, ten times;
# prints the minor page faults of those ten rounds.
ROUNDS = f"""
import resource, sys
from infermesh import heap
if sys.argv[1] == "reuse":
    assert heap.reuse_message_buffers({MESSAGE_BYTES})
source = b"x" * {MESSAGE_BYTES}
def one_round():
    first, second = bytearray(source), bytearray(source)
    del first, second
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reused_message_buffers_cost_no_page_faults_where_fresh_mappings_fault_every_page() -> None:
    pages = 2 * MESSAGE_BYTES // 4096
    assert _page_faults("default") > 5 * pages  # glibc's own thresholds: most rounds map (and fault) afresh
    assert _page_faults("reuse") < pages // 10


def test_a_max_message_above_what_glibc_accepts_is_capped_not_refused() -> None:
    code = "from infermesh import heap; print(heap.reuse_message_buffers(2**30), heap.reuse_message_buffers(1))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
