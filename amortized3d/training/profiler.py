"""FLOPs, time and memory of a training step, by stage, forward and backward.

    profiler = StageProfiler(device)
    with profiler:                                   # every aten op of the step passes through it
        with profiler.stage("generator"):            # forward stages: named by the caller (or by module hooks,
            representation = generator(...)          #   attach_stage)
        ...
        loss.backward()                              # backward ops: charged to the forward stage that built them
        with profiler.stage("optimizer"):
            optimizer.step()
    profiler.table()  -> {stage: {"flops", "seconds", "ops", "peak_bytes"}}

FLOPs come from the formulas of ``torch.utils.flop_counter`` (the registry ``FlopCounterMode`` counts with: matrix
products, convolutions and attention, forward and backward; other ops count 0), applied op by op. A backward op
is charged to "<stage> backward", where <stage> is the forward stage whose autograd node it runs: each node keeps
the sequence number it was created with, and the profiler records the sequence number at every change of forward
stage. Time is the wall time of each op (with a device synchronisation after each op on CUDA, so the stage times
add up but the step runs slower than it would unmeasured); memory is the allocated bytes after each op on CUDA and
the process's resident memory after each op on the CPU, the largest value per stage.

The registry has attention formulas for the CUDA kernels only; importing this module adds the same formulas
(4 b h s_q s_k d forward, 2.5 times that backward) for the CPU's fused attention op, which scaled_dot_product_attention
runs on the CPU and which ``FlopCounterMode`` would otherwise count as 0.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

OTHER = "other"
GRADIENT_ACCUMULATION = "gradient accumulation"  # AccumulateGrad nodes: writing .grad of the leaves
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _register_cpu_attention_flops() -> None:
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value))
    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, query, key, value))


_register_cpu_attention_flops()


def op_flops(func, args, kwargs, out) -> int:
    """The FLOPs of one aten op by torch.utils.flop_counter's formulas (0 for ops it has none for)."""
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **(kwargs or {}), out_val=out)) if formula is not None else 0


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class StageProfiler(TorchDispatchMode):
    """A dispatch mode that charges each op's FLOPs, time and memory to the current stage (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.stats: dict[str, dict[str, float]] = {}
        self._stack = [OTHER]
        self._starts = [(-1, OTHER)]  # (first sequence number, forward stage), increasing

    # --- stages ---
    def _switch(self, name: str) -> None:
        seq = torch._C._autograd._get_sequence_nr()
        if self._starts[-1][0] == seq:
            self._starts[-1] = (seq, name)
        else:
            self._starts.append((seq, name))

    def _push(self, name: str) -> None:
        self._stack.append(name)
        self._switch(name)

    def _pop(self) -> None:
        self._stack.pop()
        self._switch(self._stack[-1])

    @contextlib.contextmanager
    def stage(self, name: str):
        """Ops run inside are charged to ``name`` (nested stages: to the innermost); the backward of the autograd nodes
        they create, to ``name + " backward"``."""
        self._push(name)
        try:
            yield
        finally:
            self._pop()

    def attach_stage(self, module: torch.nn.Module, name: str, when=None) -> list:
        """Charge every forward call of ``module`` to stage ``name`` (``when()`` false: leave the call to the enclosing
        stage). -> the hook handles (call .remove() on each to detach)."""
        entered = []

        def pre(_module, _args):
            active = when is None or when()
            entered.append(active)
            if active:
                self._push(name)

        def post(_module, _args, _out):
            if entered.pop():
                self._pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def wrap(self, fn, name: str):
        """``fn`` with every call run inside ``stage(name)``."""

        def staged(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return staged

    def _backward_stage(self, node) -> str:
        seq = node._sequence_nr()
        if seq >= 2**63:  # AccumulateGrad (no sequence number)
            return GRADIENT_ACCUMULATION
        return self._starts[bisect.bisect_right(self._starts, (seq, "\uffff")) - 1][1] + " backward"

    # --- the dispatch mode ---
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        name = self._backward_stage(node) if node is not None else self._stack[-1]
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else resident_bytes()
        row = self.stats.setdefault(name, {"flops": 0, "seconds": 0.0, "ops": 0, "peak_bytes": 0})
        row["flops"] += op_flops(func, args, kwargs, out)
        row["seconds"] += seconds
        row["ops"] += 1
        row["peak_bytes"] = max(row["peak_bytes"], memory)
        return out

    def table(self) -> dict[str, dict[str, float]]:
        """{stage: {"flops", "seconds", "ops", "peak_bytes"}}, forward stages first in the order they ran."""
        return dict(sorted(self.stats.items(), key=lambda kv: kv[0].endswith(" backward")))

    def total_flops(self) -> int:
        return int(sum(row["flops"] for row in self.stats.values()))
