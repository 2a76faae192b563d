"""M0 and M1 evaluated together, running the fine levels they share once.

The ``shared`` training strategy freezes the finest levels of the common base before M0 and
M1 are fine-tuned (``finetune_freeze``), so both models hold bit-identical weights there.
Those levels are where almost all of a Glow's work is (a level's cost scales with its grid:
the two finest levels of ``cpu-cxr`` are 94 % of its convolutions), and their terms cancel
in the posterior anyway. :class:`ModelPair` finds the shared prefix by comparing the weights
(never by trusting a flag), runs it once and continues each model from the state it leaves;
the result is the same two log-densities or maps as scoring each model on its own, at about
half the cost. Wrappers are followed: two :class:`~flows.glow.Translated` with the same views pair
their inner models per view (translation, mirror image), two :class:`~flows.glow.Averaged` pair member with
member. Anything else (a conditional Glow, mismatched wrappers) is scored model by model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.glow import (
    Averaged,
    FlowModel,
    Glow,
    Translated,
)


def shared_levels(a: Glow, b: Glow) -> int:
    """How many finest levels (flow steps and split prior) ``a`` and ``b`` hold identically.

    At most ``levels - 1``: a model sharing every level with the other is the same model.
    """
    if a is b or a.config != b.config or a.config.conditions:
        return 0
    sa, sb = a.state_dict(), b.state_dict()
    k = 0
    for i in range(a.config.levels - 1):
        prefixes = (f"levels.{i}.", f"splits.{i}.")
        keys = [key for key in sa if key.startswith(prefixes)]
        if not all(key in sb and sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key])
                   for key in keys):
            break
        k += 1
    return k


class ModelPair:
    """Log-densities and maps of two models of one input, sharing what they share."""

    def __init__(self, m0: FlowModel, m1: FlowModel) -> None:
        self.m0, self.m1 = m0, m1
        self._shared: dict[tuple[int, int], int] = {}

    def _k(self, a: Glow, b: Glow) -> int:
        key = (id(a), id(b))
        if key not in self._shared:
            self._shared[key] = shared_levels(a, b)
        return self._shared[key]

    @property
    def shared(self) -> int:
        """Shared fine levels of the (first) underlying Glow pair; 0 when scored separately."""
        a, b = self.m0, self.m1
        while (inner := _inner_pairs(a, b)) is not None:
            a, b = inner[0]
        return self._k(a, b) if isinstance(a, Glow) and isinstance(b, Glow) else 0

    def log_p(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p0(x), log p1(x))`` per sample, float64."""
        return self._run(self.m0, self.m1, x, False)

    def log_p_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both models' per-position log-density maps ``(N, *spatial)`` (each sums to log p)."""
        return self._run(self.m0, self.m1, x, True)

    def _run(self, a: FlowModel, b: FlowModel, x: Tensor, maps: bool) -> tuple[Tensor, Tensor]:
        inner = _inner_pairs(a, b)
        if inner is not None and isinstance(a, Translated):
            (ia, ib), outs = inner[0], []
            for v in a.views(x):
                pa, pb = self._run(ia, ib, a.view(x, v), maps)
                outs.append((a.unview_map(pa, v), a.unview_map(pb, v)) if maps else (pa, pb))
            return _mean_pairs(outs)
        if inner is not None:
            return _mean_pairs([self._run(ma, mb, x, maps) for ma, mb in inner])
        if isinstance(a, Glow) and isinstance(b, Glow) and self._k(a, b):
            return self._glows(a, b, x, maps)
        if maps:
            return a.log_p_map(x), b.log_p_map(x)
        return a(x).log_p, b(x).log_p

    def _glows(self, a: Glow, b: Glow, x: Tensor, maps: bool) -> tuple[Tensor, Tensor]:
        a.check_input(x)
        k, n_levels = self._k(a, b), a.config.levels
        h, zs, terms = a.run_levels(x, None, maps, 0, k)
        out = []
        for m in (a, b):
            _, zs_m, terms_m = m.run_levels(h, None, maps, k, n_levels)
            out.append(m.position_map(terms + terms_m, x) if maps
                       else Glow.output(zs + zs_m, terms + terms_m).log_p)
        return out[0], out[1]


def _inner_pairs(a: FlowModel, b: FlowModel) -> list[tuple[FlowModel, FlowModel]] | None:
    """The model pairs inside two like wrappers (same views, same member count), else None."""
    if isinstance(a, Translated) and isinstance(b, Translated) and a.same_views(b):
        return [(a.model, b.model)]
    if isinstance(a, Averaged) and isinstance(b, Averaged) and len(a.members) == len(b.members):
        return list(zip(a._each(), b._each(), strict=True))
    return None


def _mean_pairs(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    if len(pairs) == 1:
        return pairs[0]
    return (torch.stack([p[0] for p in pairs]).mean(0), torch.stack([p[1] for p in pairs]).mean(0))

