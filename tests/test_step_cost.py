"""The cheap paths of a K-BFGS / K-BFGS(L) step (benchmarks/step_cost.md): the one-flag
finiteness test, the capture's untouched single call, the dense L-BFGS matrix of K-BFGS(L)
against an independent product-form oracle and against the compact applies it replaces, the
pass-1 statistic set rejected as a whole, and bounds on the ops a step dispatches."""

import math
from collections import Counter

import pytest
import test_kbfgs
import torch
import torch.nn.functional as F
from layer_helpers import make_closure
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from secant import KBFGS, KBFGSL
from secant.layers import LayerCapture
from secant.linalg import compact_apply, new_history, push
from secant.linalg.bfgs import all_finite
from secant.linalg.lbfgs import dense_inverse

D = torch.float64


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def mlp(seed, sizes=(5, 6, 4, 3), dtype=D):
    return test_kbfgs.mlp(seed, sizes, dtype)


def batches(n_steps):
    return test_kbfgs.batches(n_steps, seed=3)


# ---------------------------------------------------------------- all_finite
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_all_finite_one_flag_over_several_tensors(bad):
    a, b = torch.tensor([1.0, -0.0, 3e38]), torch.tensor(2.0)
    assert bool(all_finite(a)) and bool(all_finite(a, b, a[:0]))
    assert bool(all_finite(torch.full((3,), 3e38)))  # a plain sum would overflow
    for t in (a.clone(), torch.eye(3)):
        t.view(-1)[1] = bad
        assert not bool(all_finite(t)) and not bool(all_finite(b, t))


# ---------------------------------------------------------------- dense L-BFGS matrix
def product_form(pairs, gamma, n):
    h = gamma * torch.eye(n, dtype=D)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        left = torch.eye(n, dtype=D) - rho * torch.outer(s, y)
        h = left @ h @ left.T + rho * torch.outer(s, s)
    return h


@pytest.mark.parametrize("m,n_push", [(3, 0), (3, 2), (3, 8), (5, 17)])
def test_dense_inverse_is_lbfgs_of_the_ring(m, n_push):
    """Three blocks of one chunk each, pairs accepted at random (so the rings hold different
    pairs and wrap at different steps): ``dense_inverse`` equals the product-form L-BFGS
    matrix of each ring's last ``m`` accepted pairs from ``γ I``, and ``compact_apply`` of I."""
    gen = torch.Generator().manual_seed(m * 100 + n_push)
    b, c = 3, 6
    h = new_history(torch.arange(b), b, m, c, dtype=D)
    pairs = [[] for _ in range(b)]
    for _ in range(n_push):
        s = torch.randn(b, c, generator=gen, dtype=D)
        y = s + 0.3 * torch.randn(b, c, generator=gen, dtype=D)
        accept = torch.rand(b, generator=gen) < 0.7
        push(h, s, y, accept)
        for k in range(b):
            if accept[k]:
                pairs[k] = (pairs[k] + [(s[k], y[k])])[-m:]
    gamma = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    got = dense_inverse(h, gamma)
    for k in range(b):
        torch.testing.assert_close(got[k], product_form(pairs[k], gamma[k], c), rtol=1e-10,
                                   atol=1e-12)
    eye = torch.eye(c, dtype=D).expand(b, c, c)
    torch.testing.assert_close(got, compact_apply(h, eye, gamma).transpose(1, 2), rtol=1e-12,
                               atol=1e-13)


class CompactKBFGSL(KBFGSL):
    """K-BFGS(L) with the compact applies on every layer (no dense H_g)."""

    def _hg_matrix(self, stack):
        return None


@pytest.mark.parametrize("eps", [1e-4, 3.0])
def test_kbfgsl_dense_hg_path_equals_compact_applies(eps):
    """``history_size=3``: every layer (widths 6, 4, 3 ≤ 2·3) takes the dense path; its
    iterates, counters and history equal those of the compact applies over 12 steps, through
    the ring wrapping (and, with ``cautious_eps=3``, rejected pairs)."""
    data = batches(12)
    runs = []
    for cls in (KBFGSL, CompactKBFGSL):
        model = mlp(6)
        opt = cls(model, lr=0.5, damping=0.1, history_size=3, cautious_eps=eps)
        losses = [float(opt.step(make_closure(opt, model, x, y))) for x, y in data]
        runs.append((model, opt, losses))
    (m1, o1, l1), (m2, o2, l2) = runs
    assert l1 == pytest.approx(l2, rel=1e-12)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12)
    d1, d2 = o1.diagnostics(), o2.diagnostics()
    for key in ("g_pairs_accepted_per_layer", "history_length", "dd_step1_active_per_layer"):
        assert d1[key] == d2[key], key
    assert max(d1["g_pairs_accepted_per_layer"]) > 3  # the ring wrapped


def test_kbfgsl_uses_dense_hg_only_up_to_twice_the_history():
    opt = KBFGSL(mlp(0), lr=0.1, history_size=2)  # widths 6 > 4, then 4 and 3 ≤ 4
    dense = {i: opt._hg_matrix(st) is not None for st in opt._stacks for i in st.index}
    assert dense == {0: False, 1: True, 2: True}
    stack = next(st for st in opt._stacks if 1 in st.index)
    torch.testing.assert_close(opt._hg_matrix(stack)[stack.index.index(1)],
                               torch.eye(4, dtype=D))


# ---------------------------------------------------------------- capture
def test_single_call_statistics_are_returned_untouched():
    """One call per layer (the usual step): ``collect`` returns the tensors ``reduce`` made
    (no finiteness test, no masked copy, no division), non-finite ones included; from a second
    call on, a non-finite first call is left out of the mean."""
    lin = nn.Linear(3, 2).to(D)
    cap = LayerCapture(lin, {"fc": lin})
    made = [torch.full((3,), math.inf, dtype=D), torch.ones(2, dtype=D)]
    cap.start(lambda module, rec: made)
    with CountOps() as mode:
        lin(torch.randn(4, 3, dtype=D)).sum().backward()
        out = cap.collect()["fc"]
    assert out is made
    assert not {"where", "masked_fill", "div", "eq", "cat", "_to_copy"} & set(mode.ops)

    xs = [torch.randn(4, 3, dtype=D) for _ in range(2)]
    scales = iter([math.inf, 1.0])
    cap.start(lambda module, rec: [rec.x.T @ rec.x * next(scales), rec.g.sum(dim=(0, 1))])
    for x in xs:
        lin(x).sum().backward()
    xx, gs = cap.collect()["fc"]
    assert cap.last_calls == {"fc": 2}
    torch.testing.assert_close(xx, xs[1].T @ xs[1])
    torch.testing.assert_close(gs, torch.full((2,), 4.0, dtype=D))


# ---------------------------------------------------------------- K-BFGS
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_non_finite_pass1_gradients_reject_the_whole_statistic_set(cls):
    """Pass 1's loss overflows (finite inputs and pre-activations, non-finite pre-activation
    gradients): the set ``(A, v, h̄, ḡ)`` is rejected as a whole, as when the capture masked
    it: ``A``, ``H_a``, ``H_g``, ``s̄``, ``ȳ`` keep their values, every layer counts a rejected
    statistic, pair and ``H_a`` update."""
    model = mlp(2)
    opt = cls(model, lr=0.1)
    (x, y), = batches(1)
    opt.step(make_closure(opt, model, x, y))
    keys = ("A", "H_a", "s_bar", "y_bar", "H_g" if cls is KBFGS else "hist_z")
    before = [{k: ls[k].clone() for k in keys} for ls in opt.state["kbfgs"]["layers"]]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss * (math.inf if len(calls) == 1 else 1.0)).backward()
        return loss

    opt.step(closure)
    for ls, old in zip(opt.state["kbfgs"]["layers"], before):
        for k in keys:
            assert torch.equal(ls[k], old[k]), k
    d = opt.diagnostics()
    for key in ("stats_rejected", "g_pairs_rejected", "a_updates_rejected"):
        assert d[key + "_per_layer"] == [1, 1, 1], key


def step_ops(make, widths):
    """Aten ops of one steady-state step of the optimizer ``make(model)`` on an MLP of
    ``widths`` (float32, batch 100, a sigmoid cross-entropy on the first inputs)."""
    x = torch.rand(100, widths[0], generator=torch.Generator().manual_seed(0))
    model = mlp(0, widths, torch.float32)
    opt = make(model)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), x[:, :widths[-1]])
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    with CountOps() as mode:
        opt.step(closure)
    return sum(mode.ops.values())


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("cls,bound", [(KBFGS, 62), (KBFGSL, 80)])
def test_ops_per_layer_of_a_step(cls, bound):
    """Aten ops a steady-state step dispatches beyond an SGD step on the same model, per
    Kronecker layer (the digits autoencoder of benchmarks/step_cost.py): 351 (K-BFGS) and 513
    (K-BFGS(L)) layer by layer with a flag per tensor, 60 and 77 with the layers in stacks, 58
    and 75 with a capture that does not detach what needs no detaching; a guard against
    regressions, not a target."""
    widths = (64, 32, 16, 8, 16, 32, 64)
    per_layer = (step_ops(lambda m: cls(m, lr=0.1), widths) - step_ops(sgd, widths)) / 6
    assert per_layer <= bound


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_ops_of_a_step_grow_with_stacks_not_with_layers(cls):
    """Eight more layers of one shape (one stack) add what each layer needs on its own (the
    capture, the direction: ≈ 30 ops), not another curvature update each (≈ 200)."""
    few, many = ((16,) * (k + 1) for k in (4, 12))
    extra = [step_ops(lambda m: cls(m, lr=0.1), w) - step_ops(sgd, w) for w in (few, many)]
    assert (extra[1] - extra[0]) / 8 <= 35
