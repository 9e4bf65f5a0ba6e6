"""FSDP2 (``fully_shard``) and HSDP on gloo CPU ranks: every optimizer equals the one-process
run on the same global batch (uneven and empty shards included); Neumann and MomentumLBFGS
resume exactly from a ``torch.distributed.checkpoint`` save, also on another number of ranks;
unsupported layouts refuse with a ``ValueError`` on every rank, at construction."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_harness import spawn
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import secant

GLOBAL_BATCH = 24
STEPS = 12


class Block(nn.Module):
    """A stock transformer encoder layer (its attention projections go to the layer
    optimizers' first-order fallback) between a Linear embedding and a head, 3 positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


MODELS = {  # kind: (builder, input shape of one example)
    # Linear layers with and without bias, a LayerNorm, and a 2-row head: on 3 ranks its
    # shards are 1, 1 and 0 rows (an empty shard)
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16),
                                  nn.Linear(16, 11, bias=False), nn.Tanh(), nn.Linear(11, 2)),
            (6,)),
    "transformer": (Block, (3, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(48, 2)), (2, 4, 4)),
}
SHARDED_ALONE = (nn.Linear, nn.Conv2d, nn.TransformerEncoderLayer)


def model(kind="mlp", dtype=torch.float64):
    torch.manual_seed(0)
    return MODELS[kind][0]().to(dtype)


def neumann(params):
    return secant.Neumann(params, lr=0.05, burn_in_steps=2, reset_period=3)


OPTIMIZERS = {  # a pair every 2 steps from step 4: 5 pairs in 12 steps, the ring of 3 wraps
    "neumann": neumann,
    # compiled (dynamo only): the local squares and the update as graphs, the reduce between
    "neumann-compiled": lambda ps: secant.Neumann(ps, lr=0.05, burn_in_steps=2, reset_period=3,
                                                  compile="eager"),
    "mlbfgs": lambda ps: secant.MomentumLBFGS(ps, lr=0.05, weight_decay=0.01, beta=0.9,
                                              history_size=3, update_period=2),
    "mlbfgs-tensor-kl": lambda ps: secant.MomentumLBFGS(
        ps, lr=0.05, beta=0.9, history_size=3, update_period=2, blocks="tensor",
        step_rule="kl_clip", kl_clip=1e-4),
}
# layer optimizers, built over the model: factors every 2 steps, inverses every 4; K-BFGS(L)'s
# rings of 3 wrap in 12 steps
LAYER_OPTIMIZERS = {
    "kfac": lambda m: secant.KFAC(m, lr=0.05, damping=0.1, weight_decay=0.01,
                                  factor_update_period=2, inverse_update_period=4),
    "kfac-comm": lambda m: secant.KFAC(m, lr=0.05, damping=0.1, factor_update_period=2,
                                       inverse_update_period=4, inverse_method="cholesky",
                                       distributed_mode="communication"),
    "kbfgs": lambda m: secant.KBFGS(m, lr=0.05, damping=0.3),
    "kbfgsl": lambda m: secant.KBFGSL(m, lr=0.05, damping=0.3, history_size=3),
}


def build(name, net):
    return LAYER_OPTIMIZERS[name](net) if name in LAYER_OPTIMIZERS else \
        OPTIMIZERS[name](net.parameters())


def batch(step, kind="mlp"):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, *MODELS[kind][1], generator=gen, dtype=torch.float64)
    return x, x.flatten(1)[:, :2].sin()


def train(net, opt, steps, start=0, rank=0, world=1, kind="mlp"):
    """``world`` ranks each take their slice of the global batch; FSDP2 averages the
    gradients, so the step sees the global batch's mean-loss gradient."""
    for t in range(start, start + steps):
        x, y = batch(t, kind)
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

        def closure(x=x[rows], y=y[rows]):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def sharded(mesh_shape, kind="mlp", dtype=torch.float64, **fsdp):
    """``model(kind)`` sharded per layer and at the root; ``fsdp``: more ``fully_shard``
    options."""
    names = ("replicate", "shard")[-len(mesh_shape):]  # HSDP: replicate × shard
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    net = model(kind, dtype)
    for layer in net.children():
        if isinstance(layer, SHARDED_ALONE):
            fully_shard(layer, mesh=mesh, **fsdp)
    return fully_shard(net, mesh=mesh, **fsdp)


def full_params(net):
    return [p.full_tensor() for p in net.parameters()]


def _worker_equal(rank, world, out_dir, mesh_shape, name, kind="mlp"):
    net = sharded(mesh_shape, kind)
    opt = build(name, net)
    train(net, opt, STEPS, rank=rank, world=world, kind=kind)
    diag = opt.diagnostics()  # norms are collectives
    try:
        copy.deepcopy(opt)
        copied = "copied"
    except TypeError as e:
        copied = str(e)
    torch.save({"params": full_params(net), "diag": diag, "copy": copied},
               os.path.join(out_dir, f"rank{rank}.pt"))


def reference(name="neumann", steps=STEPS, kind="mlp"):
    net = model(kind)
    opt = build(name, net)
    train(net, opt, steps, kind=kind)
    return net, opt


def check_equal(tmp_path, world, name, keys, kind="mlp"):
    """Every rank's full parameters and the diagnostics ``keys`` equal the one-process run's;
    returns the reference's diagnostics."""
    net, opt = reference(name, kind=kind)
    want = opt.diagnostics()
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for p, q in zip(res["params"], net.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
        for key in keys:
            assert res["diag"][key] == pytest.approx(want[key], rel=1e-9)
        if "copy" in res:  # a sharded optimizer refuses deepcopy, naming what to do instead
            assert "FSDP2" in res["copy"] and "state_dict()" in res["copy"]
    return want


@pytest.mark.parametrize("world,mesh_shape,name", [
    (2, (2,), "neumann"), (3, (3,), "neumann"), (4, (2, 2), "neumann"),
    (3, (3,), "neumann-compiled")])
def test_neumann_equals_one_process(tmp_path, world, mesh_shape, name):
    """FSDP2 on 2 and 3 ranks (3: uneven shards and an empty one), HSDP on a 2 × 2 mesh;
    compiled, its step split around the reduction of the squares."""
    spawn(world, _worker_equal, str(tmp_path), mesh_shape, name, pinned_by_torch=True)
    want = check_equal(tmp_path, world, name, ("displacement_norm", "distance_to_average"))
    assert want["resets"] >= 2  # burn-in, resets and regular Neumann steps all ran


@pytest.mark.parametrize("world,mesh_shape,name", [
    (2, (2,), "mlbfgs"), (3, (3,), "mlbfgs-tensor-kl"), (4, (2, 2), "mlbfgs")])
def test_momentum_lbfgs_equals_one_process(tmp_path, world, mesh_shape, name):
    """One block per group, and one block per tensor with the KL clip (on 3 ranks the head's
    weight and bias blocks are empty on rank 2); HSDP on a 2 × 2 mesh."""
    spawn(world, _worker_equal, str(tmp_path), mesh_shape, name, pinned_by_torch=True)
    want = check_equal(tmp_path, world, name, (
        "pairs_accepted_per_block", "history_length", "last_step_norm", "direction_cosine",
        "direction_cosine_per_block", "gamma_per_block", "curvature_max_per_block"))
    assert want["pairs_accepted"] == 5 * len(want["history_length"])
    assert max(want["history_length"]) == 3  # the ring wrapped
    assert want["direction_cosine"] < 1 - 1e-6  # the curvature turned the step


@pytest.mark.parametrize("world,mesh_shape,name", [
    (2, (2,), "kfac"), (3, (3,), "kfac-comm"), (2, (2,), "kbfgs"), (3, (3,), "kbfgsl"),
    (4, (2, 2), "kbfgs")])
def test_layer_optimizers_equal_one_process(tmp_path, world, mesh_shape, name):
    """K-FAC (eigen, weight decay; Cholesky in communication mode), K-BFGS and K-BFGS(L) with
    its ring wrapping: each rank gathers a layer's gradient and updates its own rows; on 3
    ranks the head's shards are 1, 1 and 0 rows; HSDP on a 2 × 2 mesh."""
    spawn(world, _worker_equal, str(tmp_path), mesh_shape, name, pinned_by_torch=True)
    want = check_equal(tmp_path, world, name, ())
    if name.startswith("kfac"):
        assert want["factor_updates"] == STEPS // 2
        return
    assert want["g_pairs_accepted"] == 3 * STEPS and want["dd_step2_active"] > 0
    # memory mode: a layer's counters are its owner's, 0 on the other ranks
    diags = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["diag"]
             for r in range(world)]
    for key in ("g_pairs_accepted_per_layer", "dd_step1_active_per_layer",
                "dd_step2_active_per_layer") + (("history_length",) if name == "kbfgsl" else ()):
        assert [sum(col) for col in zip(*(d[key] for d in diags))] == want[key]


@pytest.mark.filterwarnings("ignore:.*functional form")
@pytest.mark.parametrize("kind,name,world", [
    ("transformer", "kbfgs", 3), ("transformer", "mlbfgs", 2), ("cnn", "kfac", 2),
    ("cnn", "neumann", 3)])
def test_transformer_block_and_cnn_equal_one_process(tmp_path, kind, name, world):
    """A stock ``nn.TransformerEncoderLayer`` (Kronecker MLP, first-order attention and norms)
    and a Conv2d + Linear model, sharded per layer; on 3 ranks the conv's 3 output channels
    and the heads' 2 rows give uneven and empty shards."""
    spawn(world, _worker_equal, str(tmp_path), (world,), name, kind, pinned_by_torch=True)
    check_equal(tmp_path, world, name, (), kind)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*functional form")
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", ["neumann", "mlbfgs", "kfac", "kbfgs", "kbfgsl"])
def test_every_optimizer_model_and_world_equals_one_process(tmp_path, name, kind, world):
    """The whole matrix (slow: ``pytest -m slow``); CI runs the sample above."""
    spawn(world, _worker_equal, str(tmp_path), (world,), name, kind, pinned_by_torch=True)
    check_equal(tmp_path, world, name, (), kind)


def _worker_dcp_save(rank, world, out_dir, name):
    net = sharded((world,))
    opt = build(name, net)
    train(net, opt, STEPS // 2, rank=rank, world=world)
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=os.path.join(out_dir, "ckpt"))


def _worker_dcp_load(rank, world, out_dir, name):
    net = sharded((world,))
    opt = build(name, net)
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    train(net, opt, STEPS - STEPS // 2, start=STEPS // 2, rank=rank, world=world)
    torch.save({"params": full_params(net), "diag": opt.diagnostics()},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name,save_world,load_world", [
    ("neumann", 2, 3), ("mlbfgs", 2, 3), ("mlbfgs-tensor-kl", 3, 2), ("kfac", 2, 3),
    ("kbfgsl", 3, 2)])
def test_dcp_resume_is_exact(tmp_path, name, save_world, load_world):
    """Saved with ``dcp.save`` after half the steps, loaded on another number of ranks (the
    state is resharded; K-FAC's inverses move to the layers' new owners), the rest of the run
    equals one process's."""
    spawn(save_world, _worker_dcp_save, str(tmp_path), name, pinned_by_torch=True)
    spawn(load_world, _worker_dcp_load, str(tmp_path), name, pinned_by_torch=True)
    keys = {"neumann": ("displacement_norm",), "kfac": (), "kbfgsl": ()}.get(name, (
                "pairs_accepted_per_block", "history_length", "gamma_per_block",
                "direction_cosine"))
    check_equal(tmp_path, load_world, name, keys)


def partly_sharded():
    net = model()
    fully_shard(net[0], mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return net


REFUSED = {  # name: (build, words the message must hold)
    "KFAC over a partly sharded model": (lambda: secant.KFAC(partly_sharded()),
                                         ("FSDP2", "DTensor")),
    "KBFGS with a process group": (
        lambda: secant.KBFGS(sharded((dist.get_world_size(),)), process_group=dist.group.WORLD),
        ("FSDP2", "process_group")),
    "MomentumLBFGS with an unsharded parameter": (lambda: secant.MomentumLBFGS(
        [*sharded((dist.get_world_size(),)).parameters(),
         nn.Parameter(torch.zeros(3, dtype=torch.float64))]), ("FSDP2", "DTensor")),
}


def _worker_refused(rank, world, out_dir):
    messages = {}
    for name, (build_it, _) in REFUSED.items():
        try:
            build_it()
        except ValueError as e:
            messages[name] = str(e)
    dist.barrier()  # every rank got here: no hang, no abort
    torch.save(messages, os.path.join(out_dir, f"rank{rank}.pt"))


def test_unsupported_layouts_refuse_on_every_rank(tmp_path):
    spawn(2, _worker_refused, str(tmp_path), timeout=120, pinned_by_torch=True)
    for r in range(2):
        messages = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert set(messages) == set(REFUSED)
        for name, (_, words) in REFUSED.items():
            assert all(w in messages[name] for w in words), messages[name]


def _worker_bf16(rank, world, out_dir):
    """FSDP2 with bf16 compute (``MixedPrecisionPolicy``: bf16 parameters in the forward and
    backward, float32 gradient reduction): every optimizer trains, its state in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for name in ("kfac", "kbfgs", "mlbfgs", "neumann"):
        net = sharded((world,), dtype=torch.float32, mp_policy=policy)
        opt = build(name, net)
        losses = []
        for t in range(STEPS):
            x, y = (v.float() for v in batch(t % 2))
            rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

            def closure(x=x[rows], y=y[rows], net=net, opt=opt):
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(x).float(), y)
                loss.backward()
                return loss
            losses.append(float(opt.step(closure)))
        dtypes = {t.dtype for e in opt.state_dict()["state"].values() for t in e.values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()}
        out[name] = (losses, sorted(map(str, dtypes)))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_bf16_mixed_precision_trains_with_float32_state(tmp_path):
    spawn(2, _worker_bf16, str(tmp_path), pinned_by_torch=True)
    for r in range(2):
        for name, (losses, dtypes) in torch.load(tmp_path / f"rank{r}.pt").items():
            assert all(math.isfinite(v) for v in losses), name
            assert losses[-1] < 0.8 * losses[0], (name, losses)
            assert dtypes == ["torch.float32"], (name, dtypes)
