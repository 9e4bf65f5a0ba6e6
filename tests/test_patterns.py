"""Every optimizer through the common training patterns (docs/patterns.md, "Works with").

Each cell trains a tiny model on one fixed batch (the loss must end finite and clearly below
its start) or raises the documented error at set-up.
"""

import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secant import KBFGS, KBFGSL, KFAC, MomentumLBFGS, Neumann

LAYER = ("KFAC", "KBFGS", "KBFGSL")
ALL = (*LAYER, "MomentumLBFGS", "Neumann")
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster (and steadier on a shared machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------- models / data
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc1(x))))


class Block(nn.Module):
    """Embedding projection, a stock nn.TransformerEncoderLayer, mean pool, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.embed(x)).mean(1))


def make(kind, seed=0):
    torch.manual_seed(seed)
    model = {"cnn": CNN, "mlp": MLP, "block": Block}[kind]()
    shape = {"cnn": (16, 1, 4, 4), "mlp": (16, 6), "block": (16, 5, 4)}[kind]
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def build(name, model, params=None, **kw):
    """Each optimizer with settings that train these tiny problems in a few steps."""
    if name == "KFAC":
        return KFAC(model, **{"lr": 0.05, "damping": 0.1, "factor_update_period": 1,
                              "inverse_update_period": 2, "kl_clip": None, **kw})
    if name == "KBFGS":
        return KBFGS(model, **{"lr": 0.3, "damping": 0.3, **kw})
    if name == "KBFGSL":
        return KBFGSL(model, **{"lr": 0.3, "damping": 0.3, "history_size": 5, **kw})
    params = model.parameters() if params is None else params
    if name == "MomentumLBFGS":
        return MomentumLBFGS(params, **{"lr": 0.05, "update_period": 2, "history_size": 3,
                                        **kw})
    return Neumann(params, **{"lr": 0.05, **kw})


def opt_lr(name):
    return build(name, nn.Linear(1, 1)).defaults["lr"]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def closure_for(opt, model, x, y, ctx=None, micro=1):
    """zero_grad, forward (optionally under ``ctx()``), backward over ``micro`` micro-batches
    (each loss divided by ``micro``), return the mean loss."""
    def closure():
        opt.zero_grad()
        total = 0.0
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            if ctx is None:
                loss = loss_fn(model, xb, yb) / micro
            else:
                with ctx():
                    loss = loss_fn(model, xb, yb) / micro
            loss.backward()
            total = total + loss.detach()
        return total
    return closure


def train(opt, model, x, y, steps=15, ctx=None, micro=1, after_step=None):
    losses = []
    for k in range(steps):
        losses.append(float(opt.step(closure_for(opt, model, x, y, ctx, micro))))
        if after_step is not None:
            after_step(k)
    with torch.no_grad():
        losses.append(float(loss_fn(model, x, y)))
    return losses


def assert_trains(losses, ratio=0.85):
    assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), losses
    assert losses[-1] < ratio * losses[0], losses


# ---------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["cnn", "mlp", "block"])
def test_float32_baseline(name, kind):
    model, x, y = make(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention fallback warning (own test below)
        opt = build(name, model)
    assert_trains(train(opt, model, x, y))


@pytest.mark.parametrize("name", ALL)
def test_bf16_params(name):
    model, x, y = make("cnn")
    model = model.to(torch.bfloat16)
    opt = build(name, model)
    losses = train(opt, model, x.to(torch.bfloat16), y)
    assert_trains(losses)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if name in LAYER:  # curvature state in float32 (the dtype policy)
        ls = opt.state[opt.state_key]["layers"][0]
        assert all(t.dtype == torch.float32 for t in ls.values() if t.is_floating_point())


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast(name):
    model, x, y = make("mlp")
    opt = build(name, model)

    def ctx():
        return torch.autocast("cpu", torch.bfloat16)
    assert_trains(train(opt, model, x, y, ctx=ctx))


@pytest.mark.parametrize("name", LAYER)
def test_step_called_inside_autocast(name):
    """The whole loop inside one autocast region: the closure keeps autocast, the curvature
    math does not, and the stale autocast weight cache is cleared after the step. (Stock
    torch.optim optimizers, and MomentumLBFGS / Neumann, need autocast around the forward only:
    inside one long region autocast keeps using its cached casts of the old weights.)"""
    model, x, y = make("mlp")
    opt = build(name, model)
    with torch.autocast("cpu", torch.bfloat16):
        assert_trains(train(opt, model, x, y))


@pytest.mark.parametrize("name", ALL)
def test_fp16_autocast_with_grad_scaler(name):
    model, x, y = make("mlp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    if name in ("KBFGS", "KBFGSL"):
        with pytest.raises(ValueError, match="grad_scaler=.*GradScaler does not support "
                                             "closures"):
            build(name, model, grad_scaler=scaler)
        return
    opt = build(name, model, **({"grad_scaler": scaler} if name == "KFAC" else {}))
    losses = []
    for _ in range(25):
        opt.zero_grad()
        with torch.autocast("cpu", torch.float16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(loss_fn(model, x, y)))
    assert_trains(losses)
    if name == "KFAC":
        assert opt.diagnostics()["stats_rejected"] == 0


def test_kfac_grad_scaler_factors_match_unscaled_run():
    """With grad_scaler= the G factor is that of the unscaled loss (checked against a float32
    run without scaler), and an overflowing (skipped) step leaves the factors alone."""
    m1, x, y = make("mlp")
    m2, _, _ = make("mlp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    o1 = build("KFAC", m1, lr=0.0)
    o2 = build("KFAC", m2, lr=0.0, grad_scaler=scaler)
    o1.step(closure_for(o1, m1, x, y))
    o2.zero_grad()
    scaler.scale(loss_fn(m2, x, y)).backward()
    scaler.step(o2)
    scaler.update()
    g1, g2 = o1.state["kfac"]["layers"][0]["G"], o2.state["kfac"]["layers"][0]["G"]
    torch.testing.assert_close(g2, g1)
    # an overflow: the scaler skips the step; the statistics of that backward are dropped
    o2.zero_grad()
    scaler.scale(loss_fn(m2, x, y) * float("inf")).backward()
    scaler.step(o2)
    scaler.update()
    o2.zero_grad()
    scaler.scale(loss_fn(m2, x, y)).backward()
    scaler.step(o2)
    assert torch.isfinite(o2.state["kfac"]["layers"][0]["G"]).all()
    assert o2.diagnostics()["stats_rejected"] == 0


@pytest.mark.parametrize("name", ALL)
def test_attention_block(name):
    model, x, y = make("block")
    if name in LAYER:
        with pytest.warns(UserWarning, match=r"enc\.self_attn\.out_proj.*fallback"):
            opt = build(name, model)
        names = opt.layer_names
        assert "enc.linear1" in names and "enc.self_attn.out_proj" not in names
    else:
        opt = build(name, model)
    assert_trains(train(opt, model, x, y))


@pytest.mark.parametrize("name", ALL)
def test_gradient_accumulation(name):
    model, x, y = make("cnn")
    opt = build(name, model)
    assert_trains(train(opt, model, x, y, micro=2))


def test_kfac_accumulation_factors_are_micro_batch_means():
    """Two micro-batches (losses halved) give the mean of the two single-batch factors
    (references: one KFAC step on each half alone, in float64)."""
    model, x, y = make("mlp")
    model = model.double()
    x = x.double()
    ref = []
    for xb, yb in zip(x.chunk(2), y.chunk(2)):
        m, _, _ = make("mlp")
        m = m.double()
        o = build("KFAC", m, lr=0.0)
        o.step(closure_for(o, m, xb, yb))
        ref.append(o.state["kfac"]["layers"][0])
    opt = build("KFAC", model, lr=0.0)
    opt.zero_grad()
    for xb, yb in zip(x.chunk(2), y.chunk(2)):
        (loss_fn(model, xb, yb) / 2).backward()
    opt.step()
    ls = opt.state["kfac"]["layers"][0]
    for key in ("A", "G"):
        torch.testing.assert_close(ls[key], (ref[0][key] + ref[1][key]) / 2)


@pytest.mark.parametrize("name", ALL)
def test_add_param_group(name):
    model, x, y = make("mlp")
    for p in model.head.parameters():
        p.requires_grad_(False)
    if name in LAYER:
        opt = build(name, model)
    else:
        opt = build(name, model, params=[p for p in model.parameters() if p.requires_grad])
    train(opt, model, x, y, steps=2)
    for p in model.head.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model.head.parameters())})
    if name in LAYER:
        assert "head" in opt.layer_names
    head0 = model.head.weight.detach().clone()
    assert_trains(train(opt, model, x, y))
    assert not torch.equal(head0, model.head.weight)


def test_add_param_group_refuses_unknown_option():
    model, _, _ = make("mlp")
    for p in model.head.parameters():
        p.requires_grad_(False)
    opt = build("KFAC", model)
    with pytest.raises(ValueError, match="lr=-1"):
        opt.add_param_group({"params": list(model.head.parameters()), "lr": -1})


def recipe_groups(model):
    """No weight decay on biases and norm weights; half the learning rate on the head."""
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n
                or "bn" in n]
    return no_decay


@pytest.mark.parametrize("name", ALL)
def test_param_group_recipes(name):
    model, x, y = make("mlp")
    no_decay = recipe_groups(model)
    if name in LAYER:
        opt = build(name, model, weight_decay=1e-2, param_groups=[
            {"params": no_decay, "weight_decay": 0.0},
            {"modules": [model.head], "lr": opt_lr(name) / 2}])
        head = opt.layer_group(opt.layer_names.index("head"))
        assert head["lr"] == opt_lr(name) / 2
    else:
        ids = {id(p) for p in no_decay}
        opt = build(name, model, params=[
            {"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": no_decay, "weight_decay": 0.0}], weight_decay=1e-2) \
            if name == "MomentumLBFGS" else build(name, model, params=[
                {"params": [p for p in model.parameters() if id(p) not in ids]},
                {"params": no_decay, "lr": 0.02}])
    assert_trains(train(opt, model, x, y))


def test_weight_decay_applies_to_weight_not_bias_of_a_layer():
    """A K-FAC step with zero gradient and no forward (factors stay I, so the inverses are
    ``(1 + √λ)⁻¹ I``): the update is ``-lr·wd·[W, 0]/(1 + √λ)²`` — the bias is not decayed."""
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin)
    opt = KFAC(model, lr=0.1, momentum=0.0, weight_decay=0.5, kl_clip=None,
               param_groups=[{"params": [lin.bias], "weight_decay": 0.0}])
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.zeros_like(lin.bias)
    opt.step()
    shrink = 0.1 * 0.5 / (1 + 1e-3 ** 0.5) ** 2
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - shrink))
    torch.testing.assert_close(lin.bias.detach(), b0)


@pytest.mark.parametrize("name", LAYER)
def test_per_module_lr_reaches_the_layer(name):
    """``lr=0`` for the head: the head does not move, the other layers do."""
    model, x, y = make("mlp")
    opt = build(name, model, param_groups=[{"modules": [model.head], "lr": 0.0}])
    head0, fc0 = model.head.weight.detach().clone(), model.fc1.weight.detach().clone()
    train(opt, model, x, y, steps=2)
    assert torch.equal(head0, model.head.weight)
    assert not torch.equal(fc0, model.fc1.weight)


def test_param_groups_refuse_split_layer_settings():
    model, _, _ = make("mlp")
    with pytest.raises(ValueError, match="'fc1'.*only weight_decay may differ"):
        KFAC(model, param_groups=[{"params": [model.fc1.bias], "lr": 0.5}])
    with pytest.raises(ValueError, match="key='eps'"):
        KFAC(model, param_groups=[{"params": [model.fc1.bias], "eps": 0.5}])


class Branchy(nn.Module):
    """A branch used on odd steps only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.extra = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.use_extra = False

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


@pytest.mark.parametrize("name", ALL)
def test_layer_used_on_some_steps(name):
    _, x, y = make("mlp")
    torch.manual_seed(0)
    model = Branchy()

    def toggle(k):
        model.use_extra = k % 2 == 0
    opt = build(name, model)
    extra0 = model.extra.weight.detach().clone()
    model.use_extra = False
    opt.step(closure_for(opt, model, x, y))
    assert torch.equal(extra0, model.extra.weight)  # no gradient: not updated at all
    model.use_extra = True
    assert_trains(train(opt, model, x, y, after_step=toggle))


@pytest.mark.parametrize("name", LAYER)
def test_second_optimizer_on_the_same_model(name):
    model, x, y = make("mlp")
    old = build(name, model)
    train(old, model, x, y, steps=1)
    with pytest.warns(UserWarning, match=f"earlier {name}; its hooks were removed"):
        opt = build(name, model)
    assert_trains(train(opt, model, x, y))
    with pytest.raises(RuntimeError, match="newer optimizer"):
        old.step(closure_for(old, model, x, y))


@pytest.mark.parametrize("name", ALL)
def test_model_and_optimizer_are_freed_when_dropped(name):
    """Nothing keeps a trained model or its optimizer alive once dropped, by reference counting
    alone (no garbage collection): a leak or a reference cycle would also keep a process group
    they reference, and its threads, alive, at worst into interpreter exit."""
    model, x, y = make("mlp")
    opt = build(name, model)
    train(opt, model, x, y, steps=2)
    refs = [weakref.ref(model), weakref.ref(opt)]
    gc.collect()
    gc.disable()
    try:
        del model, opt
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ALL)
def test_lr_scheduler(name):
    model, x, y = make("mlp")
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k))
    assert_trains(train(opt, model, x, y, after_step=lambda k: sched.step()))
    assert all(g["lr"] < g["initial_lr"] for g in opt.param_groups)


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip(name):
    """Save after 3 steps, load into a fresh model + optimizer (weights_only=True), and the
    next 3 steps are bit-identical to the uninterrupted run."""
    model, x, y = make("cnn")
    opt = build(name, model)
    train(opt, model, x, y, steps=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _, _ = make("cnn", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2 = build(name, model2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    a = train(opt, model, x, y, steps=3)
    b = train(opt2, model2, x, y, steps=3)
    assert a == b
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def dynamo_or_skip():
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported here")
    return dynamo


class Compiled(nn.Module):
    """The optimizer sees the eager model (its hooks), training runs the compiled forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fwd = torch.compile(model, backend="eager")  # graph capture only: fast

    def forward(self, x):
        return self.fwd(x)


@pytest.mark.parametrize("name", ALL)
def test_compiled_model_trains(name):
    dynamo = dynamo_or_skip()
    dynamo.reset()
    model, x, y = make("mlp")
    opt = build(name, model)
    losses = train(opt, Compiled(model), x, y)
    assert_trains(losses)


def test_kfac_capture_causes_no_graph_break_between_factor_updates():
    """Steps that do not capture compile to one graph (no break); capture steps break at the
    hooked layers (dynamo cannot trace a gradient hook that stores its tensor)."""
    dynamo = dynamo_or_skip()
    from torch._dynamo.utils import counters
    model, x, y = make("mlp")
    opt = build("KFAC", model, factor_update_period=1000)
    fwd = torch.compile(model, backend="eager")

    def one_step():
        opt.zero_grad()
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
    dynamo.reset()
    one_step()  # step 1 captures
    counters.clear()
    for _ in range(3):
        one_step()
    assert sum(counters["graph_break"].values()) == 0
    assert opt.state["kfac"]["factor_updates"] == 1
    dynamo.reset()
    counters.clear()
    twin, _, _ = make("mlp")
    twin.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="hooks were removed"):
        opt2 = build("KFAC", model, factor_update_period=1)
    opt_twin = build("KFAC", twin, factor_update_period=1)
    for o, f in ((opt2, fwd), (opt_twin, twin)):
        o.zero_grad()
        F.cross_entropy(f(x), y).backward()
        o.step()
    assert all("side effect" in reason for reason in counters["graph_break"])
    for key in ("A", "G"):  # the compiled forward captured the same statistics as eager
        torch.testing.assert_close(opt2.state["kfac"]["layers"][0][key],
                                   opt_twin.state["kfac"]["layers"][0][key])


def test_kbfgs_second_pass_moves_batchnorm_statistics_once():
    model, x, y = make("cnn")
    ref, _, _ = make("cnn")
    opt = build("KBFGS", model)
    opt.step(closure_for(opt, model, x, y))
    ref(x)  # one training-mode forward: the reference running statistics
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 1
