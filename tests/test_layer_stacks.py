"""Layer stacks (secant.optim.layer_stacks, docs/kronecker.md "Layer stacks"): which layers
share a stack, the views the per-layer state holds, the padded packing, the batched BFGS update
against dense per-matrix references, and a K-BFGS step with a layer that sits one out."""

import pytest
import test_kbfgs
import torch
from layer_helpers import make_closure
from torch import nn

from secant import KBFGS, KBFGSL
from secant.linalg import bfgs_inverse_update_
from secant.linalg.bfgs import rows_finite
from secant.optim import layer_stacks
from secant.optim.layer_stacks import LayerStack, plan

D = torch.float64


def sizes(*dims):
    return [{"H": (n, n), "v": (n,)} for n in dims]


def test_plan_pads_small_layers_together_and_keeps_large_different_ones_apart():
    assert plan(sizes(3, 5, 4), ["k"] * 3) == [[0, 2, 1]]  # tiny: one stack, sorted by size
    assert plan(sizes(3, 5, 4), ["a", "b", "a"]) == [[0, 2], [1]]  # kinds never mix
    big = layer_stacks.PAD_FREE  # one n x n matrix as large as the free allowance
    n = int(big ** 0.5) + 1
    assert plan(sizes(n, n), ["k"] * 2) == [[0, 1]]  # equal shapes: no padding at all
    assert plan(sizes(n, 2 * n), ["k"] * 2) == [[0], [1]]  # 1.6x its own state: apart
    assert plan(sizes(n, n + 1), ["k"] * 2) == [[0, 1]]  # within 1.2x


def test_stack_views_alias_the_stacks_and_pad_with_identity_or_zeros():
    layers = [{"H": torch.full((2, 2), 5.0), "v": torch.ones(2)},
              {"H": torch.full((3, 3), 7.0), "v": torch.full((3,), 2.0)}]
    stack = LayerStack([4, 9], layers, eye=frozenset({"H"}))
    h = stack.tensors["H"]
    assert h.shape == (2, 3, 3) and stack.index == [4, 9]
    want = torch.eye(3).repeat(2, 1, 1)
    want[0, :2, :2] = 5.0
    want[1] = 7.0
    assert torch.equal(h, want)
    assert torch.equal(stack.tensors["v"], torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    layers[0]["H"].mul_(2)  # the per-layer tensors are views: writes reach the stack
    assert torch.equal(h[0, :2, :2], torch.full((2, 2), 10.0))
    assert layers[0]["H"].shape == (2, 2) and layers[1]["v"].shape == (3,)


def test_pack_pads_each_layer_into_its_corner():
    layers = [{"v": torch.zeros(2)}, {"v": torch.zeros(4)}]
    stack = LayerStack([0, 1], layers)
    a = [torch.arange(4.0).view(2, 2), torch.arange(9.0).view(3, 3)]
    b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])]
    for k in range(3):  # later calls write the same stacks: new values, padding still zero
        a, b = [t * (k + 1) for t in a], [t + k for t in b]
        pa, pb = stack.pack([[a[0], b[0]], [a[1], b[1]]], [(3, 3), (4,)])
        want_a = torch.zeros(2, 3, 3)
        want_a[0, :2, :2], want_a[1] = a[0], a[1]
        want_b = torch.zeros(2, 4)
        want_b[0, :2], want_b[1] = b[0], b[1]
        assert torch.equal(pa, want_a) and torch.equal(pb, want_b)


def test_batched_bfgs_update_equals_each_matrix_alone_and_keeps_the_padding():
    gen = torch.Generator().manual_seed(0)
    sizes_ = (4, 6, 3)
    hs, ss, ys = [], [], []
    for n in sizes_:
        q = torch.randn(n, n, generator=gen, dtype=D)
        hs.append(q @ q.T + torch.eye(n, dtype=D))
        s = torch.randn(n, generator=gen, dtype=D)
        ss.append(s)
        ys.append(s * 2 + 0.1 * torch.randn(n, generator=gen, dtype=D))
    ys[2] = -ss[2]  # sᵀy < 0: this matrix is not updated
    accept = torch.tensor([True, True, False])
    stack = torch.eye(6, dtype=D).repeat(3, 1, 1)
    s_pad, y_pad = torch.zeros(3, 6, dtype=D), torch.zeros(3, 6, dtype=D)
    for j, n in enumerate(sizes_):
        stack[j, :n, :n], s_pad[j, :n], y_pad[j, :n] = hs[j], ss[j], ys[j]
    accept[2] = True
    ok = bfgs_inverse_update_(stack, s_pad, y_pad, accept & (s_pad * y_pad).sum(1).gt(0))
    assert ok.tolist() == [True, True, False]
    for j, n in enumerate(sizes_):
        want = test_kbfgs.dense_bfgs(hs[j], ss[j], ys[j]) if ok[j] else hs[j]
        torch.testing.assert_close(stack[j, :n, :n], want, rtol=1e-12, atol=1e-12)
        assert torch.equal(stack[j, n:, n:], torch.eye(6 - n, dtype=D))
        assert not stack[j, :n, n:].any() and not stack[j, n:, :n].any()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_rows_finite_flags_each_layer(bad):
    a, b = torch.ones(3, 4), torch.ones(3, 2, 2)
    b[1, 0, 1] = bad
    assert rows_finite(a, b).tolist() == [True, False, True]
    assert rows_finite(a).tolist() == [True, True, True]


class Branchy(nn.Module):
    """A trunk and a head, plus a spare head used only when ``spare`` is set."""

    def __init__(self, with_spare):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.spare = nn.Linear(6, 4) if with_spare else None
        self.use_spare = False
        self.to(D)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        out = self.head(h)
        if self.use_spare:
            out = out + self.spare(h)[:, :3]
        return out


def run(cls, with_spare, spare_steps, data):
    """Train ``Branchy`` with the spare head used on ``spare_steps``; every step checks that
    the spare head's state is bit for bit unchanged by a step it did not take part in."""
    model = Branchy(with_spare)
    opt = cls(model, lr=0.3, damping=0.1)
    assert len(opt._stacks) == 1  # the spare head shares the others' stack
    losses = []
    for k, (x, y) in enumerate(data):
        model.use_spare = with_spare and k in spare_steps
        before = {key: t.clone() for key, t in opt.state["kbfgs"]["layers"][-1].items()}
        losses.append(float(opt.step(make_closure(opt, model, x, y))))
        if with_spare and not model.use_spare:
            after = opt.state["kbfgs"]["layers"][-1]
            assert all(torch.equal(before[key], after[key]) for key in before), k
    return model, opt, losses


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_a_layer_that_sits_a_step_out_keeps_its_state_while_its_stack_steps(cls):
    """A layer without data and gradient in a step (a branch not taken) keeps its state and
    counters while the rest of its stack steps; a spare head never used leaves the others'
    iterates those of the model without it."""
    data = test_kbfgs.batches(6)
    _, opt, losses = run(cls, True, (0, 1), data)
    d = opt.diagnostics()
    assert d["g_pairs_accepted_per_layer"][2] + d["g_pairs_rejected_per_layer"][2] == 2
    assert d["g_pairs_accepted_per_layer"][0] + d["g_pairs_rejected_per_layer"][0] == 6
    assert all(map(torch.isfinite, torch.tensor(losses)))
    m1, o1, l1 = run(cls, True, (), data)
    m2, o2, l2 = run(cls, False, (), data)
    assert l1 == pytest.approx(l2, rel=1e-12)
    for name in ("trunk", "head"):
        for p, q in zip(getattr(m1, name).parameters(), getattr(m2, name).parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
