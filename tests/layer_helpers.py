"""Small helpers shared by the layer-optimizer tests."""

from contextlib import contextmanager

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


@contextmanager
def no_host_sync():
    """Make every Python-level device-to-host conversion of a tensor (``.item()``,
    ``bool()``, ``float()``, ``int()``, ``.tolist()``) raise inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in a steady-state step")

    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
