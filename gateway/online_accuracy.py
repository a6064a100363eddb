"""Online accuracy (M4): labels joined to logged predictions, per model version over a sliding window.

Each version keeps one window (infermesh.windows.SlidingCounts, float sums) with, per true label (0 and 1), the
histogram of the scores it was given in SCORE_BINS bins, the count judged correct at the model's threshold and the
sum of squared errors. From it: accuracy at the threshold and the Brier score (exact), and the AUC from the binned
scores (exact when no bin holds scores of both labels; otherwise ties count half, within 1/SCORE_BINS). The cost
per label batch is a few vectorised numpy calls; the gauges are set after each batch and by `export` (the window
slides while no label arrives). Pure logic: no transport, no Redis.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from prometheus_client import Gauge

from infermesh import metrics
from infermesh.windows import SlidingCounts

SCORE_BINS = 100
CORRECT = SCORE_BINS  # column of the counts judged correct
SQUARED_ERROR = SCORE_BINS + 1  # column of the sums of (score - label)^2
MAX_VERSIONS = 256  # versions with a window; the one labelled longest ago makes room


class VersionAccuracy:
    def __init__(self, model: str, version: str, window_s: float, slots: int, min_labels: int, now: float) -> None:
        self.model, self.version = model, version
        self.min_labels = min_labels
        self.window = SlidingCounts(2, SCORE_BINS + 2, window_s, slots, now, dtype=np.float64)
        self._labels = metrics.ONLINE_LABELS.labels(model, version)

    def add(self, labels: np.ndarray, scores: np.ndarray, threshold: float, now: float) -> None:
        """Labels (0 or 1) and the scores the version gave, judged at `threshold`."""
        scores = np.clip(scores.astype(np.float64), 0.0, 1.0)
        positive = labels >= 0.5
        bins = np.minimum((scores * SCORE_BINS).astype(np.intp), SCORE_BINS - 1)
        rows = positive.astype(np.intp)
        update = np.zeros((2, SCORE_BINS + 2))
        np.add.at(update, (rows, bins), 1.0)
        np.add.at(update[:, CORRECT], rows, ((scores >= threshold) == positive).astype(np.float64))
        np.add.at(update[:, SQUARED_ERROR], rows, (scores - positive) ** 2)
        self.window.add(update, now)
        self.export(now)

    def summary(self, now: float) -> dict[str, float]:
        """labels, and with any: accuracy, brier; with both labels present: auc."""
        self.window.advance(now)
        total = self.window.total
        count = float(total[:, :SCORE_BINS].sum())
        found: dict[str, float] = {"labels": count}
        if count == 0:
            return found
        found["accuracy"] = float(total[:, CORRECT].sum()) / count
        found["brier"] = float(total[:, SQUARED_ERROR].sum()) / count
        negative, positive = total[0, :SCORE_BINS], total[1, :SCORE_BINS]
        negatives, positives = negative.sum(), positive.sum()
        if negatives > 0 and positives > 0:
            below = np.cumsum(negative) - negative  # negatives in lower bins than each bin
            found["auc"] = float((positive * (below + 0.5 * negative)).sum() / (positives * negatives))
        return found

    def export(self, now: float) -> None:
        summary = self.summary(now)
        self._labels.set(summary["labels"])
        if summary["labels"] < self.min_labels:
            # Too few to judge: no series at all (a 0 would read as a model that is always wrong).
            self._forget(metrics.ONLINE_ACCURACY, metrics.ONLINE_BRIER, metrics.ONLINE_AUC)
            return
        metrics.ONLINE_ACCURACY.labels(self.model, self.version).set(summary["accuracy"])
        metrics.ONLINE_BRIER.labels(self.model, self.version).set(summary["brier"])
        if "auc" in summary:
            metrics.ONLINE_AUC.labels(self.model, self.version).set(summary["auc"])
        else:
            self._forget(metrics.ONLINE_AUC)

    def forget(self) -> None:
        self._forget(metrics.ONLINE_ACCURACY, metrics.ONLINE_BRIER, metrics.ONLINE_AUC, metrics.ONLINE_LABELS)

    def _forget(self, *gauges: Gauge) -> None:
        for gauge in gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(self.model, self.version)


class OnlineAccuracy:
    """A window per model version, bounded to MAX_VERSIONS."""

    def __init__(self, window_s: float = 3600.0, slots: int = 12, min_labels: int = 20) -> None:
        self.window_s, self.slots, self.min_labels = window_s, slots, min_labels
        self._versions: OrderedDict[tuple[str, str], VersionAccuracy] = OrderedDict()

    def version(self, model: str, version: str, now: float) -> VersionAccuracy:
        key = (model, version)
        found = self._versions.get(key)
        if found is None:
            if len(self._versions) >= MAX_VERSIONS:
                _, oldest = self._versions.popitem(last=False)
                oldest.forget()
            found = self._versions[key] = VersionAccuracy(
                model, version, self.window_s, self.slots, self.min_labels, now
            )
        self._versions.move_to_end(key)
        return found

    def add(
        self, model: str, version: str, labels: Sequence[float], scores: Sequence[float], threshold: float, now: float
    ) -> None:
        self.version(model, version, now).add(np.asarray(labels), np.asarray(scores), threshold, now)

    def export(self, now: float) -> None:
        for window in self._versions.values():
            window.export(now)
