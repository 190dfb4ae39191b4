"""Adam for the registration's few tensors, without ``torch.optim``.

The first ``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (its ``__init__`` is
wrapped to disable compilation), and that import costs 2-3 s on a small CPU: more than the affine
stage itself on a brain pair. :class:`Adam` makes the same update as ``torch.optim.Adam``'s
single-tensor path (what it runs on the CPU: no weight decay, no AMSGrad), operation for operation, so
results do not change; its ``lr`` may be changed between steps (the affine stage's schedule).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps)``'s update, for tensors that require grad."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.betas = betas
        self.eps = float(eps)
        self.steps = 0
        self._moments = [(torch.zeros_like(p, memory_format=torch.preserve_format),
                          torch.zeros_like(p, memory_format=torch.preserve_format)) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (always set to ``None``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on every parameter with a gradient."""
        self.steps += 1
        beta1, beta2 = self.betas
        step = float(self.steps)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        for p, (exp_avg, exp_avg_sq) in zip(self.params, self._moments):
            if p.grad is None:
                continue
            grad = p.grad
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
