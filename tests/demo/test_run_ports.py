"""`make run`'s HTTP/REST port: Triton's 8000 when free, else a free one rather than a failed start."""

from __future__ import annotations

import socket

from demo.run import _free_or_any


def test_a_held_port_gives_way_to_a_free_one_and_a_free_port_is_kept() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        assert _free_or_any(held) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert _free_or_any(free) == free
