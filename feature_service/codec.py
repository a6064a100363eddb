"""The stored form of a feature vector: packing, unpacking, and the block a read answers. Pure: no Redis, no I/O.

Layout, chosen so a read of E entities is one MGET and a numpy decode: one key per (view, entity),
`{prefix}:fv:{view}:{entity_id}` → 8-byte little-endian int64 event_time_ms, then one little-endian float32
per feature in the view's declared order. NaN marks a feature never written; a vector shorter than the view
(features appended later) lacks the new features. The event time is per vector: a partial update refreshes
the age of the features it merges with, and last-write-wins compares whole vectors.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from feature_service.views import FeatureView
from infermesh.errors import InvalidInput
from infermesh.features import FeatureBlock, FeatureStatus

log = logging.getLogger(__name__)

HEADER = struct.Struct("<q")
VALUE_DTYPE = np.dtype("<f4")
NAN_BYTES = np.array([np.nan], dtype=VALUE_DTYPE).tobytes()  # the one NaN pattern we store: 00 00 c0 7f
# Lua numbers are doubles: event times above 2**53 would compare inexactly in the upsert script.
MAX_EVENT_TIME_MS = 2**53

_PRESENT, _NOT_FOUND, _STALE = (
    np.uint8(status) for status in (FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.STALE)
)


def pack_vector(event_time_ms: int, values: np.ndarray) -> bytes:
    return HEADER.pack(event_time_ms) + np.ascontiguousarray(values, dtype=VALUE_DTYPE).tobytes()


@lru_cache(maxsize=256)
def _row_dtype(width: int) -> np.dtype:
    return np.dtype([("event_time_ms", "<i8"), ("values", VALUE_DTYPE, (width,))])


@lru_cache(maxsize=256)
def _missing_row(width: int) -> bytes:
    return HEADER.pack(0) + NAN_BYTES * width


def _fit(blob: bytes | None, width: int) -> bytes:
    """One stored vector brought to the view's width: missing features NaN, extra ones dropped."""
    if blob is None:
        return _missing_row(width)
    size = HEADER.size + VALUE_DTYPE.itemsize * width
    length = len(blob)
    if length == size:
        return blob
    if length < HEADER.size or (length - HEADER.size) % VALUE_DTYPE.itemsize:
        log.warning("malformed stored feature vector ignored", extra={"fields": {"bytes": length}})
        return _missing_row(width)
    if length < size:
        return blob + NAN_BYTES * ((size - length) // VALUE_DTYPE.itemsize)
    return blob[:size]  # the view lost trailing features since this vector was written


def unpack_vectors(blobs: Sequence[bytes | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors → (event_time_ms int64 [E], values float32 [E, width]); a missing row: time 0, all NaN."""
    size = HEADER.size + VALUE_DTYPE.itemsize * width
    # Per-entity fix-ups only when needed: the common case is one join and one frombuffer.
    if None in blobs or set(map(len, blobs)) != {size}:  # type: ignore[arg-type]  # `or`: len() never sees a None
        blobs = [_fit(blob, width) for blob in blobs]
    rows = np.frombuffer(b"".join(blobs), dtype=_row_dtype(width))  # type: ignore[arg-type]  # no None left here
    return rows["event_time_ms"], rows["values"]


def build_block(
    view: FeatureView,
    feature_names: tuple[str, ...],
    columns: np.ndarray | None,
    event_times: np.ndarray,
    stored: np.ndarray,
    now_ms: int,
) -> tuple[FeatureBlock, int]:
    """Select the asked columns and compute values, statuses and ages, all vectorised.

    `columns` indexes the stored vector (None: all, in order); `stored` is float32 [E, view.width].
    Returns the block and how many of its rows exist but are stale (for metrics).
    """
    selected = stored if columns is None else stored[:, columns]
    missing = np.isnan(selected)
    row_ages = now_ms - event_times
    np.maximum(row_ages, 0, out=row_ages)  # a clock behind the writer's is not a negative age
    stale_rows = 0
    if view.max_age_ms > 0:
        stale = row_ages > view.max_age_ms
        stale &= event_times > 0  # a missing row (event time 0) is NOT_FOUND, not stale
        stale_rows = int(np.count_nonzero(stale))
    statuses = np.empty(selected.shape, dtype=np.uint8)
    if stale_rows:
        statuses[:] = np.where(stale, _STALE, _PRESENT)[:, None]
    else:
        statuses.fill(_PRESENT)
    ages = np.empty(selected.shape, dtype=np.int64)
    ages[:] = row_ages[:, None]
    if missing.any():
        defaults = view.defaults if columns is None else view.defaults[columns]
        values = np.where(missing, defaults, selected)
        statuses[missing] = _NOT_FOUND
        ages[missing] = -1
    else:  # the common case: every value present, and no masking to do
        values = np.array(selected, dtype=np.float32)
    return FeatureBlock(view.name, feature_names, values, statuses, ages), stale_rows


def encode_row(
    view: FeatureView,
    position: int,
    values: Mapping[str, float],
    event_time_ms: int,
    *,
    entity_id: str = "",
    latest_event_time_ms: int = MAX_EVENT_TIME_MS,
) -> tuple[bytes, bool]:
    """A row to write → (packed vector with NaN where not given, whether it is partial).

    An event time after `latest_event_time_ms` (now plus the allowed clock skew) is refused: last write wins by
    event time, so one far-future row would beat every genuine later write until that time came."""
    if not values:
        raise InvalidInput(f"write to view '{view.name}': row {position} has no feature values")
    try:
        event_time_ms = operator.index(event_time_ms)  # ints and numpy integers; not floats
    except TypeError:
        event_time_ms = 0
    if not 0 < event_time_ms <= MAX_EVENT_TIME_MS:
        raise InvalidInput(
            f"write to view '{view.name}': row {position} event_time_ms must be Unix epoch milliseconds (> 0)"
        )
    if event_time_ms > latest_event_time_ms:
        raise InvalidInput(
            f"write to view '{view.name}': row {position} (entity '{_clip(entity_id)}') has event_time_ms "
            f"{event_time_ms}, {(event_time_ms - latest_event_time_ms) / 1000:.0f} s beyond the allowed clock skew "
            "into the future"
        )
    index = view.index
    names = list(values)
    try:
        columns = [index[name] for name in names]
    except KeyError:
        unknown = sorted(name for name in names if name not in index)
        raise InvalidInput(f"feature view '{view.name}' has no features {_shorten(unknown)}") from None
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: refused just below
        given = np.array([values[name] for name in names], dtype=VALUE_DTYPE)
    if not np.isfinite(given).all():
        # NaN is how a vector marks "never written" (storing one would silently become NOT_FOUND); an infinity
        # (or a number beyond float32, which becomes one) would reach models as a value no training data had.
        bad = [name for name, value in zip(names, given, strict=True) if not np.isfinite(value)]
        raise InvalidInput(
            f"write to view '{view.name}': row {position} has non-finite values (NaN, ±inf or beyond float32) "
            f"for {_shorten(bad)}"
        )
    vector = np.full(view.width, np.nan, dtype=VALUE_DTYPE)
    vector[columns] = given
    return pack_vector(event_time_ms, vector), len(columns) < view.width


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _shorten(names: Sequence[str], limit: int = 10) -> list[str]:
    return list(names[:limit]) + ([f"... {len(names) - limit} more"] if len(names) > limit else [])
