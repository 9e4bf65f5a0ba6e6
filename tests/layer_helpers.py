"""Small helpers shared by the layer-optimizer tests."""

import torch
import torch.nn.functional as F


def make_closure(opt, model, x, y, calls=None):
    """The usual closure on one batch (cross-entropy); appends to ``calls`` when it runs."""
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def wtilde(lin):
    """``W̃ = [W, b]`` of a Linear layer, detached."""
    return torch.cat((lin.weight.detach(), lin.bias.detach()[:, None]), 1)
