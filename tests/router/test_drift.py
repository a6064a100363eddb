"""The router's drift windows (router.drift) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from infermesh.windows import SlidingCounts


def test_a_slot_leaves_the_window_once_it_is_window_s_old() -> None:
    window = SlidingCounts(columns=1, bins=2, window_s=10.0, slots=10, now=0.0)
    window.add(np.array([[3, 1]]), now=0.5)  # slot 0
    window.add(np.array([[0, 4]]), now=5.2)  # slot 5
    assert window.total.tolist() == [[3, 5]] and window.rows == 8
    window.advance(9.9)  # still slot 9: nothing left yet
    assert window.rows == 8
    window.advance(10.0)  # slot 10 takes slot 0's place
    assert window.total.tolist() == [[0, 4]]
    window.add(np.array([[2, 0]]), now=12.0)
    assert window.total.tolist() == [[2, 4]]
    window.advance(100.0)  # long idle: everything left, nothing negative
    assert window.total.tolist() == [[0, 0]] and window.rows == 0


@pytest.mark.parametrize("slots", [1, 3])
def test_the_ring_never_counts_a_row_twice(slots: int) -> None:
    window = SlidingCounts(columns=2, bins=3, window_s=3.0, slots=slots, now=0.0)
    rng = np.random.default_rng(0)
    added = []
    for step in range(40):
        counts = rng.integers(0, 5, size=(2, 3))
        now = step * 0.25
        window.add(counts, now)
        added.append((now, counts))
    slot_s = 3.0 / slots
    newest = int(9.75 // slot_s)
    expected = sum(c for t, c in added if int(t // slot_s) > newest - slots)
    assert window.total.tolist() == expected.tolist()
