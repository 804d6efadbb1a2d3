"""What each step of a converted model's plan costs in memory and time, measured on fake tensors.

The planner (``planner.py``) composes these per-step terms into the peak and time of any mix of
treatments (NOTE [ Step costs ]) instead of simulating every mix.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from . import _mode
from ._simulate import LiveBytes, fake_model

__all__: list[str] = []

INPUT, LOSS = "<input>", "<loss>"  # ops before the first step, and after the last

# NOTE [ Step costs ]
# One training step on fake tensors (as revify.audit runs it) is followed op by op. Each op
# belongs to a step of the plan: in the forward, the step running now (_mode.current_step); in
# the backward, the step whose output's gradient arrived last (a hook on every output the
# step hands on, registered through _mode.step_observer), as the trunk's backward runs the
# steps in reverse order. Per step it records the live bytes when its forward starts and when
# its backward starts, what its forward leaves alive (``held``: saved tensors and outputs less
# the inputs it lets go), the peak of each phase above its start, and the modelled time of its
# ops: max(FLOPs / F, bytes / B) + L per kernel, with F, B, L timed once per process on the
# device the model lives on (``speed``).
#
# A step's terms depend on its own treatment only, so for any mix the live bytes at step s are
# those of a reference measurement plus the change of ``held`` of the steps before s; the
# planner takes the maximum over steps and phases. Allocator rounding, kernel workspaces and
# steps whose backward overlaps another's are outside this model; the planner simulates the
# plan it chooses and tightens the budget by any excess (planner.choose).


@dataclass
class StepCost:
    """One step's terms in one measurement (NOTE [ Step costs ])."""

    fwd_start: int = -1
    held: int = 0
    fwd_extra: int = 0
    bwd_start: int = -1
    bwd_extra: int = 0
    time_s: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0


@dataclass
class Measurement:
    """Per-step costs of one training step, in execution order, and the step's totals."""

    steps: dict[str, StepCost] = field(default_factory=dict)
    peak: int = 0  # peak live bytes over the step
    time_s: float = 0.0


@dataclass(frozen=True)
class Speed:
    """A device's modelled throughput: FLOP/s, bytes/s and seconds per kernel."""

    flops: float
    bandwidth: float
    launch: float
    device: str

    def op_time(self, flops: float, n_bytes: float) -> float:
        return max(flops / self.flops, n_bytes / self.bandwidth) + self.launch


@functools.cache
def speed(device: str = "cpu") -> Speed:
    """Time a matmul, a large add and a tiny add on ``device``, once per process."""
    dev = torch.device(device)

    def best(fn: Any, repeat: int = 10) -> float:
        times = []
        for _ in range(repeat):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        n = 512
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        mm = best(lambda: a @ b)
        big = torch.randn(1 << 22, device=dev)
        add = best(lambda: big + big)
        tiny = torch.randn(8, device=dev)
        launch = best(lambda: [tiny + tiny for _ in range(100)]) / 100
    return Speed(
        flops=2 * n**3 / max(mm - launch, 1e-9),
        bandwidth=3 * big.nbytes / max(add - launch, 1e-9),
        launch=launch,
        device=str(dev),
    )


class _Meter(LiveBytes):
    """LiveBytes that also attributes every op's time and memory to a plan step."""

    def __init__(self, speed: Speed) -> None:
        super().__init__()
        self.speed = speed
        self.measurement = Measurement()
        self.backward = False
        self.bwd_label = LOSS
        self.started = False  # a plan step ran in this forward

    def _label(self) -> str:
        if self.backward:
            return self.bwd_label
        step = _mode.current_step.get()
        if step is not None:
            self.started = True
            return step
        return LOSS if self.started else INPUT

    def _cost(self, label: str) -> StepCost:
        steps = self.measurement.steps
        if label not in steps:
            steps[label] = StepCost()
        cost = steps[label]
        if self.backward:
            if cost.bwd_start < 0:
                cost.bwd_start = self.live
        elif cost.fwd_start < 0:
            cost.fwd_start = self.live
        return cost

    def observe(self, step: Any, outs: tuple[Any, ...]) -> None:
        """``_mode.step_observer``: follow the gradients of the step's outputs."""
        for t in outs:
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(functools.partial(self._gradient_arrived, step.name))

    def _gradient_arrived(self, name: str, grad: Tensor) -> None:
        cost = self.measurement.steps.setdefault(name, StepCost())
        if cost.bwd_start < 0:
            self.bwd_label = name
            cost.bwd_start = self.live

    def start_backward(self) -> None:
        self.backward = True
        self._cost(LOSS)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cost = self._cost(self._label())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.backward:
            cost.bwd_extra = max(cost.bwd_extra, self.live - cost.bwd_start)
        else:
            cost.fwd_extra = max(cost.fwd_extra, self.live - cost.fwd_start)
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if outs and not func.is_view:  # a kernel (not a view, nor metadata such as .device)
            packet = func._overloadpacket
            flops = 0.0
            if packet in flop_registry:
                flops = float(flop_registry[packet](*args, **(kwargs or {}), out_val=out))
            n_bytes = float(sum(
                t.numel() * t.element_size()
                for t in [*tree_leaves((args, kwargs)), *outs] if isinstance(t, Tensor)
            ))
            t = self.speed.op_time(flops, n_bytes)
            cost.flops += flops
            cost.bytes += n_bytes
            cost.kernels += 1
            cost.time_s += t
            self.measurement.time_s += t
        return out

    def finish(self) -> Measurement:
        m = self.measurement
        m.peak = self.peak
        names = list(m.steps)
        starts = [m.steps[n].fwd_start for n in names]
        end = m.steps[LOSS].bwd_start if LOSS in m.steps else self.live
        for i, name in enumerate(names):
            nxt = next((s for s in starts[i + 1:] if s >= 0), end)
            m.steps[name].held = nxt - starts[i] if starts[i] >= 0 else 0
        return m


def measure(
    model: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    spd: Speed,
    original: bool = False,
    autocast: torch.dtype | None = None,
) -> Measurement:
    """One train-mode training step of ``model`` on fake tensors (its plan's treatments as set
    now; ``original``: the code before ``convert``; ``autocast``: the forward under autocast
    to that dtype), attributed to plan steps."""
    from .audit import _stage_attributes, _train_mode

    meter = _Meter(spd)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_train_mode(model))
        stack.enter_context(_stage_attributes(model))
        stack.enter_context(fake_model(model))
        stack.enter_context(torch.enable_grad())
        if original:
            stack.enter_context(_mode._original())
        x = torch.empty(shape, dtype=dtype, device=device)
        token = _mode.step_observer.set(meter.observe)
        try:
            with meter, torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                       enabled=autocast is not None):
                out = model(x)
        finally:
            _mode.step_observer.reset(token)
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        del out
        meter.start_backward()
        with meter:
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            del outs
    return meter.finish()
