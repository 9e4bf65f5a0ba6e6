"""Layer capture: homogeneous inputs, conv patches against an explicit loop over output
positions, pre-activation gradients against autograd, and the clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secant.layers import (
    LayerCapture,
    add_to_params,
    grad_matrix,
    homogeneous_inputs,
    is_supported,
    matrix_rows,
    output_rows,
    param_matrix,
)

D = torch.float64


def raw(module, rec):
    """A ``reduce`` that keeps the call's raw record (its mean over one call is itself)."""
    return [t for t in (rec.x, rec.h_mean, rec.g) if t is not None]


def explicit_patches(x, conv):
    """ā for every (example, output position) by slicing the zero-padded input by hand."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    n, c, hp, wp = xp.shape
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, ho * wo, c * kh * kw + 1, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                       j * sw: j * sw + dw * (kw - 1) + 1: dw]
            out[:, i * wo + j, :-1] = patch.reshape(n, -1)
            out[:, i * wo + j, -1] = 1.0
    return out


def test_conv_patches_match_explicit_loop_and_reproduce_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).to(D)
    x = torch.randn(2, 3, 7, 6, dtype=D)
    a = homogeneous_inputs(conv, x)
    torch.testing.assert_close(a, explicit_patches(x, conv))
    out = conv(x)
    rows = a @ param_matrix(conv).T  # [N, T, d_out]
    torch.testing.assert_close(rows, out.flatten(2).transpose(1, 2))


def test_linear_homogeneous_and_extra_dims():
    lin = nn.Linear(4, 3).to(D)
    x = torch.randn(5, 4, dtype=D)
    a = homogeneous_inputs(lin, x)
    assert a.shape == (5, 1, 5)
    torch.testing.assert_close(a[:, 0, :4], x)
    assert (a[..., -1] == 1).all()
    nobias = nn.Linear(4, 3, bias=False)
    assert homogeneous_inputs(nobias, x.float()).shape == (5, 1, 4)
    assert homogeneous_inputs(lin, torch.randn(2, 6, 4, dtype=D)).shape == (2, 6, 5)


def test_matrix_rows_are_the_flattened_rows():
    """``matrix_rows`` equals the ``[N, T, d]`` helpers flattened (Linear on 2-D and 3-D
    inputs, conv patches) and returns a 2-D Linear tensor itself."""
    lin, conv = nn.Linear(4, 3).to(D), nn.Conv2d(2, 3, 3, padding=1).to(D)
    for module, x in ((lin, torch.randn(5, 4, dtype=D)), (lin, torch.randn(2, 6, 4, dtype=D)),
                      (conv, torch.randn(2, 2, 5, 5, dtype=D))):
        out = module(x).detach()
        a = homogeneous_inputs(module, x, ones=False)
        torch.testing.assert_close(matrix_rows(module, x, inputs=True),
                                   a.reshape(-1, a.shape[-1]), rtol=0, atol=0)
        o = output_rows(module, out)
        torch.testing.assert_close(matrix_rows(module, out, inputs=False),
                                   o.reshape(-1, o.shape[-1]), rtol=0, atol=0)
    x = torch.randn(5, 4, dtype=D)
    assert matrix_rows(lin, x, inputs=True) is x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_captured_grads_rebuild_weight_gradient(kind):
    """∇W̃ = Σ_{n,t} g ā ᵀ with the captured g and ā (an independent check of both)."""
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(6, 4).to(D)
        model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2).to(D))
        x = torch.randn(8, 6, dtype=D)
    else:
        layer = nn.Conv2d(2, 3, 3, padding=1).to(D)
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 2).to(D))
        x = torch.randn(8, 2, 5, 5, dtype=D)
    cap = LayerCapture(model, {"l": layer})
    cap.start(raw, h_mean=True)
    model(x).pow(2).sum(1).mean().backward()
    rec_x, rec_h_mean, rec_g = cap.collect()["l"]
    a = homogeneous_inputs(layer, rec_x)
    gw = torch.einsum("nto,nti->oi", rec_g, a)
    torch.testing.assert_close(gw, grad_matrix(layer))
    with torch.no_grad():
        h = layer(x)
    want = h.mean(0) if kind == "linear" else h.mean(dim=(0, 2, 3))
    torch.testing.assert_close(rec_h_mean, want)


def test_carry_reaches_layers_of_a_frozen_model():
    """With ``carry`` a frozen model's layers (no output needs grad) are captured, with the
    autograd pre-activation gradients, and in-place ops after a replaced output stay legal;
    without, nothing is."""
    torch.manual_seed(2)
    first, second = nn.Linear(3, 4).to(D), nn.Linear(4, 2).to(D)
    model = nn.Sequential(first, nn.ReLU(inplace=True), second)
    x = torch.randn(5, 3, dtype=D)
    cap = LayerCapture(model, {"first": first, "second": second})
    model.requires_grad_(False)  # as K-BFGS's second pass
    cap.start(lambda m, rec: [rec.g])
    assert not model(x).requires_grad
    assert cap.collect() == {"first": None, "second": None}
    cap.start(lambda m, rec: [rec.g], carry=True)
    model(x).pow(2).sum().backward()
    got = cap.collect()
    h1 = first(x).requires_grad_()
    h2 = second(torch.relu(h1))
    want = torch.autograd.grad(h2.pow(2).sum(), [h1, h2])
    torch.testing.assert_close(got["first"][0][:, 0], want[0])
    torch.testing.assert_close(got["second"][0][:, 0], want[1])


def test_no_capture_under_no_grad_and_when_not_started():
    lin = nn.Linear(3, 2)
    cap = LayerCapture(lin, {"l": lin})
    lin(torch.randn(4, 3)).sum().backward()  # not started: nothing recorded, no error
    assert cap.sums == {}
    cap.start(raw)
    with torch.no_grad():
        lin(torch.randn(4, 3))  # evaluation: ignored
    assert cap.sums["l"].calls == 0
    lin(torch.randn(4, 3)).sum().backward()
    assert cap.collect()["l"] is not None and cap.last_calls == {"l": 1}


def test_layers_without_data_collect_none():
    used, unused = nn.Linear(3, 3), nn.Linear(3, 3)
    model = nn.ModuleDict({"used": used, "spare": unused})
    cap = LayerCapture(model, {"used": used, "spare": unused})
    cap.start(raw)
    used(torch.randn(2, 3)).sum().backward()
    lin_out = cap.collect()
    assert lin_out["spare"] is None and lin_out["used"] is not None
    cap.start(raw)
    used(torch.randn(2, 3))  # forward without backward: the call never completes
    assert cap.collect()["used"] is None


def test_accumulated_calls_average_and_skip_non_finite():
    """Three micro-batches: the mean of their statistics; a micro-batch whose statistics are
    not finite (an fp16 overflow) is left out of the mean."""
    torch.manual_seed(3)
    lin = nn.Linear(3, 2).to(D)
    cap = LayerCapture(lin, {"fc": lin})
    xs = [torch.randn(4, 3, dtype=D) for _ in range(3)]
    cap.start(lambda m, rec: [rec.x.T @ rec.x, rec.g.sum(dim=(0, 1))])
    for k, x in enumerate(xs):
        out = lin(x)
        scale = math.inf if k == 1 else 1.0
        (out.sum() * scale).backward()
    xx, gs = cap.collect()["fc"]
    assert cap.last_calls == {"fc": 3}
    torch.testing.assert_close(xx, (xs[0].T @ xs[0] + xs[2].T @ xs[2]) / 2)
    torch.testing.assert_close(gs, torch.full((2,), 4.0, dtype=D))


def test_grad_scale_divides_captured_gradients_and_dtype_casts():
    lin = nn.Linear(3, 2)
    scale = torch.tensor(1024.0)
    cap = LayerCapture(lin, {"fc": lin}, dtype=D, grad_scale=lambda: scale)
    cap.start(raw)
    (lin(torch.randn(5, 3)).sum() * scale).backward()
    x, g = cap.collect()["fc"]
    assert x.dtype == D and g.dtype == D
    torch.testing.assert_close(g, torch.ones(5, 1, 2, dtype=D))


def test_statistics_are_reduced_outside_autocast():
    """Under a bf16 autocast forward the reduce still runs in the capture's dtype: a Gram of the
    float32 inputs matches float64 to float32 rounding (in bf16 it would be off by ~1e-2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    layer = model[2]
    cap = LayerCapture(model, {"fc": layer}, dtype=torch.float32)
    cap.start(lambda m, rec: [rec.x.reshape(-1, 16).T @ rec.x.reshape(-1, 16), rec.x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(64, 16)).float().sum().backward()
    gram, x = cap.collect()["fc"]
    assert gram.dtype == torch.float32
    x = x.reshape(-1, 16).double()
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-5)


def test_weight_sharing_raises_within_one_forward_only():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    cap = LayerCapture(model, {"fc": lin})
    cap.start(raw)
    with pytest.raises(RuntimeError, match="'fc'.*called more than once.*weight sharing"):
        model(torch.randn(2, 3))
    cap.remove()
    single = nn.Sequential(lin)
    cap2 = LayerCapture(single, {"fc": lin})
    cap2.start(raw)
    for _ in range(2):  # two forwards of the model (accumulation): fine
        single(torch.randn(2, 3)).sum().backward()
    assert cap2.collect()["fc"] is not None and cap2.last_calls == {"fc": 2}


def test_hooks_are_removable():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    cap.remove()
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    with pytest.raises(RuntimeError, match="hooks of this optimizer were removed"):
        cap.start(raw)


def test_newer_capture_takes_over_with_a_warning():
    lin = nn.Linear(3, 3)
    old = LayerCapture(lin, {"fc": lin}, owner="KFAC")
    with pytest.warns(UserWarning, match="earlier KFAC; its hooks were removed"):
        new = LayerCapture(lin, {"fc": lin}, owner="KBFGS")
    new.start(raw)
    lin(torch.randn(2, 3)).sum().backward()
    assert new.collect()["fc"] is not None
    assert not old.attached
    with pytest.raises(RuntimeError, match="newer optimizer"):
        old.start(raw)


def test_warm_capture_records_inputs_under_no_grad():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    with cap.warm(), torch.no_grad():
        cap.start(raw, grads=False)
        x = torch.randn(2, 3)
        lin(x)
        torch.testing.assert_close(cap.collect()["fc"][0], x)
    assert not cap.active


def test_supported_layers_and_param_update():
    assert is_supported(nn.Linear(2, 2)) and is_supported(nn.Conv2d(2, 2, 3))
    assert not is_supported(nn.Conv2d(2, 2, 3, groups=2))
    assert not is_supported(nn.Conv2d(2, 2, 3, padding="same"))
    assert not is_supported(nn.LayerNorm(3))
    conv = nn.Conv2d(2, 3, 3).to(D)
    before = param_matrix(conv)
    upd = torch.randn_like(before)
    add_to_params(conv, upd, -0.5)
    torch.testing.assert_close(param_matrix(conv), before - 0.5 * upd)
