"""Losses with targets sampled from the model's predictive distribution (true Fisher).

K-FAC's ``G`` factor of the true Fisher uses pre-activation gradients of the loss at targets
drawn from the model, not the data labels (Martens & Grosse 2015, §5). Each function takes the
model output, samples targets without gradient, and returns the batch mean of the per-example
loss — the same reduction the optimizers assume for the training loss (per-example gradients are
recovered as ``N ×`` the gradient of a batch mean). Pass one of them (or your own function of the
model output) as ``KFAC(..., fisher="sampled", fisher_loss=...)``. Sampling uses the global
torch generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_bce_with_logits(logits: Tensor) -> Tensor:
    """Bernoulli targets ``t ~ B(σ(z))``; BCE-with-logits summed over features, mean over batch."""
    with torch.no_grad():
        t = torch.bernoulli(torch.sigmoid(logits))
    per = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return per.reshape(per.shape[0], -1).sum(1).mean()


def sampled_mse(output: Tensor) -> Tensor:
    """Gaussian targets ``t ~ N(z, I)``; ``½‖z − t‖²`` summed over features, mean over batch."""
    with torch.no_grad():
        t = output + torch.randn_like(output)
    per = 0.5 * (output - t).pow(2)
    return per.reshape(per.shape[0], -1).sum(1).mean()


def sampled_cross_entropy(logits: Tensor) -> Tensor:
    """Categorical targets ``t ~ softmax(z)`` over dim 1; cross-entropy, mean over batch."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach(), dim=1)
        moved = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        t = torch.multinomial(moved, 1).view(*probs.movedim(1, -1).shape[:-1])
    return F.cross_entropy(logits, t)
