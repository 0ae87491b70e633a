"""In-place weight gradients for a stacked expert bank, one expert slice at a time.

Autograd hands a leaf its whole gradient tensor: for an [E, ...] bank that means writing
E slices every step, zeros for each expert that got no token. Card routing sends a layer's
tokens to a handful of its 48 experts, so most of those slices are zeros, rewritten every
step, and then read again by the gradient norm. A GradSink instead keeps the parameter's
`.grad` from one step to the next and tracks which slices hold this step's gradient:

- `recycle()` (zero_grads calls it) sets `.grad` to None and keeps the tensor; what it held
  becomes *stale*: logically zero, physically the last step's values;
- the next backward takes the tensor back, zeroes only the stale slices of experts that are
  idle this time, and overwrites (or, within one step, accumulates into) the active ones;
- `live_parts()` lists the slices that may be nonzero, for the gradient norm.

After a backward, `.grad` holds exactly what autograd would have put there, zeros included.
The sink bypasses autograd's accumulation, so hooks on the parameter do not run and
`torch.autograd.grad` does not see it: DDP, FSDP and --train_only's gradient masks need
those, and the trainer only turns sinks on in a single process without them. Gradient
accumulation over several backward calls works as usual: a slice written earlier in the
step is added to, as AccumulateGrad would.
"""

from __future__ import annotations

import torch


class GradSink:
    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self._buffer: torch.Tensor | None = None  # the tensor this sink manages as .grad
        self._fresh: set[int] = set()  # slices holding a gradient of the current step
        self._stale: set[int] = set()  # slices holding an old step's values (logically zero)
        self._recyclable = False  # set by recycle(): the buffer is ours to reuse

    def begin(self, active: list[int]) -> torch.Tensor:
        """Before a backward writes slices `active`: the parameter's .grad, every other slice
        of it valid (zero or earlier in this step)."""
        grad = self.param.grad
        if grad is None and self._recyclable:
            grad = self.param.grad = self._buffer
        elif grad is None:  # first use, or .grad was dropped by someone else: start clean
            grad = self.param.grad = self._buffer = torch.zeros_like(self.param)
            self._fresh, self._stale = set(), set()
        elif grad is not self._buffer:  # a gradient from elsewhere: accumulate into it
            self._buffer, self._fresh, self._stale = grad, set(range(len(grad))), set()
        self._recyclable = False
        for e in self._stale.difference(active):
            grad[e].zero_()
        self._stale.clear()
        return grad

    def write(self, e: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Slice e gets a @ b: written in place, or added where it already holds a gradient of
        this step (micro-batches), as AccumulateGrad would add it."""
        grad = self._buffer
        if e in self._fresh:
            grad[e].add_(torch.mm(a, b))
        else:
            torch.mm(a, b, out=grad[e])
            self._fresh.add(e)

    def live_parts(self) -> list[torch.Tensor]:
        """The slices of .grad that may be nonzero (all of it if the sink does not own it),
        each run of consecutive experts as one view: balanced routing leaves every expert
        live, and one norm call per run instead of per expert saves ~2 ms a card step."""
        grad = self.param.grad
        if grad is None:
            return []
        if grad is not self._buffer:
            return [grad]
        runs: list[list[int]] = []  # [first, end) of each run
        for e in sorted(self._fresh):
            if runs and runs[-1][1] == e:
                runs[-1][1] = e + 1
            else:
                runs.append([e, e + 1])
        return [grad[a:b] for a, b in runs]

    def recycle(self) -> None:
        """zero_grad for this parameter: .grad becomes None, its tensor is kept for reuse."""
        if self.param.grad is self._buffer and self._buffer is not None:
            self._stale |= self._fresh
            self._fresh = set()
            self._recyclable = True
        self.param.grad = None


def zero_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """optimizer.zero_grad(set_to_none=True), the sinks' gradient tensors kept for reuse."""
    for module in model.modules():
        for sink in getattr(module, "grad_sinks", ()):
            sink.recycle()
    optimizer.zero_grad(set_to_none=True)


def grad_parts(param: torch.Tensor) -> list[torch.Tensor]:
    """param's gradient as the parts that may be nonzero (see GradSink.live_parts)."""
    sink = getattr(param, "grad_sink", None)
    if sink is not None:
        return sink.live_parts()
    return [] if param.grad is None else [param.grad]
