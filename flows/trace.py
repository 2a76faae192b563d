"""Inference through TorchScript traces, made once per input shape.

A Glow is hundreds of small tensor operations; on a CPU the Python interpreter between them
costs as much as a fifth to a third of the model's time (measured in docs/benchmarks.md). A
trace of the scoring function replays the same operations without it. Traces keep no
Python control flow, so the input checks inside the models are not in them: callers check
their input before (the patch map checks the whole volume before any patch is scored).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

log = logging.getLogger(__name__)
Out = TypeVar("Out", torch.Tensor, tuple[torch.Tensor, ...])


class _Holder(torch.nn.Module, Generic[Out]):
    """Holds the models, so that the trace sees their weights as parameters."""

    def __init__(self, fn: Callable[[torch.Tensor], Out], models: Sequence[object]) -> None:
        super().__init__()
        self.fn: Callable[[torch.Tensor], Out] = fn
        self.models = torch.nn.ModuleList([m for m in models if isinstance(m, torch.nn.Module)])

    def forward(self, x: torch.Tensor) -> Out:
        return self.fn(x)


def _same(a: Out, b: Out) -> bool:
    ta = (a,) if isinstance(a, torch.Tensor) else a
    tb = (b,) if isinstance(b, torch.Tensor) else b
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
                                      for x, y in zip(ta, tb, strict=True))


class ShapeTraced(Generic[Out]):
    """``fn`` (a batch in, a tensor or tuple of tensors out, per-sample results independent of
    the rest of the batch) run through a trace made for each new sample shape.

    ``fn``'s control flow must depend on shapes only, as a Glow's does. The batch size
    stays free: each trace is made on a batch of two and checked against ``fn`` on a batch
    of three of other data (which catches most, not all, violations) before it is used; a
    function that cannot be traced, or whose trace disagrees, runs eagerly (logged once).
    Only CPU inputs without gradients are traced: on a GPU the launch queue hides the
    interpreter, and training needs autograd.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Out], models: Sequence[object], name: str) -> None:
        self.fn: Callable[[torch.Tensor], Out] = fn
        self.models, self.name = list(models), name
        self._traces: dict[tuple[object, ...], Callable[[torch.Tensor], Out] | None] = {}
        self.eager_reason: str | None = None  # why the last trace was dropped, if one was

    def __call__(self, x: torch.Tensor) -> Out:
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.shape[0] == 0:
            return self.fn(x)
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._traces:
            self._traces[key] = self._trace(x)
        t = self._traces[key]
        return self.fn(x) if t is None else t(x)

    @property
    def traced(self) -> bool:
        """Whether any trace is in use."""
        return any(t is not None for t in self._traces.values())

    def _trace(self, example: torch.Tensor) -> Callable[[torch.Tensor], Out] | None:
        one = example[:1]
        # checked on other data (the sample reversed) at another batch size
        x, probe = torch.cat([one] * 2), torch.cat([one.flip(tuple(range(1, one.ndim)))] * 3)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings for the dropped input checks
                t = torch.jit.trace(_Holder(self.fn, self.models).eval(), x, check_trace=False)
                ref = self.fn(probe)
                same = _same(t(probe), ref)
        except Exception as e:  # any failure to trace just means running eagerly
            self.eager_reason = f"tracing failed ({e})"
            log.info("%s runs eagerly: %s", self.name, self.eager_reason)
            return None
        if not same:
            self.eager_reason = "its trace disagrees with it"
            log.warning("%s runs eagerly: %s", self.name, self.eager_reason)
            return None
        return _optimised(t, probe, ref, self.name)


def _optimised(t: torch.jit.ScriptModule, probe: torch.Tensor, ref: Out, name: str
               ) -> Callable[[torch.Tensor], Out]:
    """The trace frozen (weights as constants) and optimised for inference (fused operations):
    another 1.16x on a CPU patch batch (docs/benchmarks.md, session 12). Like the trace, it
    must agree with the eager function on the probe; otherwise the plain trace is kept. The
    weights are copied in: a scorer's models must not change after its first batch."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = torch.jit.optimize_for_inference(torch.jit.freeze(t))
            if _same(o(probe), ref):
                return o
        log.info("%s keeps its plain trace: the optimised one disagrees", name)
    except Exception as e:  # optimisation is optional
        log.info("%s keeps its plain trace: optimising failed (%s)", name, e)
    return t
