"""Hugging Face ``transformers.Trainer`` with every secant optimizer.

``Trainer`` runs ``training_step`` (forward, loss, backward) on each micro-batch of an
accumulation, clips, and then calls ``optimizer.step()`` without a closure. That suits
:class:`~secant.KFAC`, :class:`~secant.MomentumLBFGS` and :class:`~secant.Neumann`, which run
unchanged. :class:`~secant.KBFGS` and :class:`~secant.KBFGSL` need a closure (their second pass
evaluates the same minibatch at the new parameters): for an optimizer with ``needs_closure``,
:class:`SecantTrainer` keeps each micro-batch, and on the last one of the accumulation calls
``optimizer.step(closure)``, where ``closure`` zeroes the gradients, runs ``Trainer``'s own
``training_step`` on every kept micro-batch (so the loss, its scaling for accumulation and
``compute_loss`` overrides are the Trainer's), clips to ``max_grad_norm`` and returns the summed
loss. The loop's ``optimizer.step()`` that follows is then a no-op. The loss is reported with
the last micro-batch (the others report 0, so the logged sums are the Trainer's).

    trainer = SecantTrainer(model=model, args=args, train_dataset=data,
                            optimizers=(secant.KBFGS(model, lr=0.1), None))
    trainer.train()

``fp16=True`` is refused for closure optimizers (``GradScaler`` refuses closures): use
``bf16=True``. Under DDP every micro-batch of an accumulation synchronises its gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import Trainer

__all__ = ["SecantTrainer"]


def _skip_next_step(opt: Optimizer) -> None:
    """Make ``opt.step`` a no-op for one call (the trainer loop's, after ``training_step`` has
    stepped), then the class's ``step`` again."""

    def skipped(closure: Any = None) -> None:
        del opt.step

    opt.step = skipped  # type: ignore[method-assign]


class SecantTrainer(Trainer):
    """``transformers.Trainer`` that gives K-BFGS and K-BFGS(L) the closure they need (module
    docstring); every other optimizer runs as in ``Trainer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._micro_batches: list[dict[str, Any]] = []

    def _closure_optimizer(self) -> Optimizer | None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        return opt if getattr(opt, "needs_closure", False) else None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        opt = self._closure_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.fp16:
            raise ValueError(f"{type(opt).__name__} evaluates a closure twice per step and "
                             "torch.amp.GradScaler does not support closures: train with "
                             "bf16=True instead of fp16=True")
        self._micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:  # more micro-batches of this step to come
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        train_step = super().training_step

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = sum(train_step(model, b, num_items_in_batch) for b in batches)
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                self._clip_grad_norm(model)
            return loss

        loss = opt.step(closure)
        _skip_next_step(opt)
        return loss
