"""Layer capture: homogeneous inputs, conv patches against an explicit loop over output
positions, pre-activation gradients against autograd, and the clear errors."""

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
    param_matrix,
)

D = torch.float64


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
    cap.start(h_mean=True)
    model(x).pow(2).sum(1).mean().backward()
    rec = cap.collect()["l"]
    a = homogeneous_inputs(layer, rec.x)
    gw = torch.einsum("nto,nti->oi", rec.g, a)
    torch.testing.assert_close(gw, grad_matrix(layer))
    with torch.no_grad():
        h = layer(x)
    want = h.mean(0) if kind == "linear" else h.mean(dim=(0, 2, 3))
    torch.testing.assert_close(rec.h_mean, want)


def test_no_capture_under_no_grad_and_when_not_started():
    lin = nn.Linear(3, 2)
    cap = LayerCapture(lin, {"l": lin})
    lin(torch.randn(4, 3)).sum().backward()  # not started: nothing recorded, no error
    assert cap.records == {}
    cap.start()
    with torch.no_grad():
        lin(torch.randn(4, 3))  # evaluation: ignored
    assert cap.records["l"].x is None
    lin(torch.randn(4, 3)).sum().backward()
    assert cap.collect()["l"].g is not None


def test_missing_data_names_the_module():
    used, unused = nn.Linear(3, 3), nn.Linear(3, 3)
    model = nn.ModuleDict({"used": used, "spare": unused})
    cap = LayerCapture(model, {"used": used, "spare": unused})
    cap.start()
    used(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="'spare'.*received no data"):
        cap.collect()


def test_forward_without_backward_is_missing_grads():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    cap.start()
    lin(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="'fc'.*pre-activation gradients"):
        cap.collect()


def test_double_call_raises():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    cap.start()
    y = lin(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="'fc'.*called more than once"):
        lin(y)


def test_hooks_are_removable():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    cap.remove()
    assert not lin._forward_hooks
    cap.start()
    lin(torch.randn(2, 3)).sum().backward()
    assert cap.records["fc"].x is None


def test_warm_capture_records_inputs_under_no_grad():
    lin = nn.Linear(3, 3)
    cap = LayerCapture(lin, {"fc": lin})
    with cap.warm(), torch.no_grad():
        cap.start(grads=False)
        x = torch.randn(2, 3)
        lin(x)
        torch.testing.assert_close(cap.collect()["fc"].x, x)
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
