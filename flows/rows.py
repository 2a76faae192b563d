"""A training set as rows of arrays that are already in memory, without copying them.

Building a bundle trains a base model on the normal and the mixture set together, M1 on the
mixture minus a held-out reference, and each model on all but a validation fraction of its
set. Done with ``np.concatenate`` and fancy indexing, each of those is a copy of the set, so a
site's 20 000 radiographs at 512×512 (20 GB on the model grid) would need three to four times
that in RAM. A :class:`Rows` is the selection alone; rows are gathered one batch at a time
(``rows[batch]``), in the order a copy would have held them, so training on it is bit for bit
training on the copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

CHUNK = 256  # rows per step when a whole set is read (checks, fingerprints)


class Rows:
    """Rows ``index`` of the arrays ``parts`` stacked along axis 0 (all of them by default)."""

    def __init__(self, parts: Sequence[np.ndarray], index: np.ndarray | None = None) -> None:
        if not parts:
            raise ValueError("Rows needs at least one array")
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"arrays of different image shapes {sorted(shapes)} cannot be one set")
        self.parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        total = int(self._starts[-1])
        self.index = np.arange(total) if index is None else np.asarray(index, dtype=np.int64)

    @classmethod
    def cat(cls, *sets: np.ndarray | Rows) -> Rows:
        """The sets one after the other (what ``np.concatenate`` would give), sharing memory."""
        parts: list[np.ndarray] = []
        index: list[np.ndarray] = []
        offset = 0
        for s in sets:
            r = s if isinstance(s, Rows) else Rows([s])
            parts += r.parts
            index.append(r.index + offset)
            offset += int(r._starts[-1])
        return cls(parts, np.concatenate(index))

    def take(self, idx: np.ndarray) -> Rows:
        """Rows ``idx`` (positions in this set) as a new selection: nothing is copied."""
        return Rows(self.parts, self.index[idx])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.parts[0].dtype

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        """The selected rows, gathered into a new array."""
        if isinstance(key, (int, np.integer)):
            raise TypeError("index a Rows with a slice or an index array (a batch)")
        rows = self.index[key]
        if len(self.parts) == 1:
            return self.parts[0][rows]
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for k, part in enumerate(self.parts):
            sel = which == k
            if sel.any():
                out[sel] = part[rows[sel] - self._starts[k]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, size: int = CHUNK) -> Iterator[np.ndarray]:
        for i in range(0, len(self), size):
            yield self[slice(i, i + size)]


ImageSet = np.ndarray | Rows


def as_rows(images: ImageSet) -> Rows:
    return images if isinstance(images, Rows) else Rows([np.asarray(images)])


def fingerprint(images: ImageSet) -> dict[str, Any]:
    """A short description of a training set that changes when any pixel does (the sha256 of
    its float32 bytes in row order, as one contiguous array would give)."""
    rows = as_rows(images)
    h = hashlib.sha256()
    total, sq, count = 0.0, 0.0, 0
    for c in rows.chunks():
        c = np.ascontiguousarray(c, dtype=np.float32)
        h.update(c.tobytes())
        total += float(c.sum(dtype=np.float64))
        sq += float(np.square(c, dtype=np.float64).sum())
        count += c.size
    mean = total / max(count, 1)
    return {"n": len(rows), "shape": list(rows.shape[1:]), "sha256": h.hexdigest(),
            "mean": mean, "std": float(np.sqrt(max(sq / max(count, 1) - mean * mean, 0.0)))}
