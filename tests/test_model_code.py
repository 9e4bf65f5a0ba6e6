"""Model code nobody here wrote: Hugging Face transformers' ``Conv1D`` (a linear layer with its
weight stored transposed) gets Kronecker curvature exactly as the equivalent ``nn.Linear``;
tied weights go to the first-order update with a warning; user layers registered with
``register_layer``; ``coverage()`` on tiny random-init GPT-2 and Llama."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secant import KBFGS, KBFGSL, KFAC
from secant.layers import LayerKind, register_layer

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

OPTIMIZERS = {
    "KFAC": lambda m: KFAC(m, lr=0.05, factor_update_period=1, inverse_update_period=2),
    "KBFGS": lambda m: KBFGS(m, lr=0.1),
    "KBFGSL": lambda m: KBFGSL(m, lr=0.1, history_size=2),
}
X = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = X[:, :2].cos()


def linear_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 2)).double()


def as_conv1d(ref):
    """The same network with transformers' Conv1D layers (weights stored transposed)."""
    layers = []
    for m in ref:
        if isinstance(m, nn.Linear):
            c = Conv1D(m.out_features, m.in_features).double()
            with torch.no_grad():
                c.weight.copy_(m.weight.t())
                c.bias.copy_(m.bias)
            layers.append(c)
        else:
            layers.append(m)
    return nn.Sequential(*layers)


def train(opt, model, steps=8):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(X), Y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_conv1d_trains_exactly_as_the_equivalent_linear(name):
    ref = linear_mlp()
    model = as_conv1d(ref)
    opt_ref, opt = OPTIMIZERS[name](ref), OPTIMIZERS[name](model)
    assert opt.coverage()["kronecker_fraction"] == 1.0
    before = ref[0].weight.detach().clone()
    train(opt_ref, ref)
    train(opt, model)
    assert (ref[0].weight - before).abs().max() > 1e-3
    for a, b in zip(ref, model):
        if isinstance(a, nn.Linear):
            torch.testing.assert_close(b.weight.t(), a.weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(b.bias, a.bias, rtol=1e-10, atol=1e-12)


class ScaledLinear(nn.Module):
    """A user's linear-like layer: ``y = 2 (x Wᵀ) + b``, weight ``[d_out, d_in]``. Registered
    below with a kind whose inputs are ``2x``, it is the linear map ``W (2x) + b``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=torch.float64))

    def forward(self, x):
        return F.linear(2 * x, self.weight, self.bias)


def test_registered_user_layer_gets_curvature():
    def rows(module, t):
        return t.reshape(t.shape[0], -1, t.shape[-1])

    unregistered = nn.Sequential(ScaledLinear(5, 8), nn.Tanh(), nn.Linear(8, 2).double())
    with pytest.warns(UserWarning, match=r"only 27\.3% of the trainable parameters"):
        assert list(KFAC(unregistered).coverage()["kronecker"]) == ["2"]
    register_layer(ScaledLinear, LayerKind(inputs=lambda m, x: rows(m, 2 * x), outputs=rows))
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(5, 8), nn.Tanh(), nn.Linear(8, 2).double())
    # reference: an nn.Linear fed 2x, with the same weights
    ref = nn.Sequential(nn.Linear(5, 8).double(), nn.Tanh(), nn.Linear(8, 2).double())
    ref.load_state_dict(model.state_dict())
    opt, opt_ref = OPTIMIZERS["KBFGS"](model), OPTIMIZERS["KBFGS"](ref)
    assert list(opt.coverage()["kronecker"]) == ["0", "2"]
    for _ in range(6):
        for o, m, x in ((opt, model, X), (opt_ref, ref, 2 * X)):
            def closure(o=o, m=m, x=x):
                o.zero_grad()
                loss = F.mse_loss(m(x), Y)
                loss.backward()
                return loss
            o.step(closure)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=16, n_embd=64, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gpt2_covers_its_conv1d_layers_and_moves_the_tied_head(name):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"lm_head \(transformer\.wte\.weight = lm_head\.weight\)"
                                         r": parameters shared"):
        opt = OPTIMIZERS[name](model)
    cov = opt.coverage()
    assert cov["kronecker_fraction"] >= 0.9
    assert "lm_head" not in cov["kronecker"] and "transformer.wte.weight" in cov["first_order"]
    assert sum(name.endswith(("c_attn", "c_proj", "c_fc")) for name in cov["kronecker"]) == 8
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        def closure():
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    assert losses[-1] < 0.9 * losses[0]


def test_llama_with_tied_embeddings_moves_the_head():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cov = KFAC(model).coverage()
    assert any("lm_head (model.embed_tokens.weight = lm_head.weight)" in str(w.message)
               for w in caught)
    assert "lm_head" not in cov["kronecker"] and len(cov["kronecker"]) == 14
    assert cov["kronecker_fraction"] > 0.9
