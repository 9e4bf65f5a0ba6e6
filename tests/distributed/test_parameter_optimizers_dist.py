"""Parameter optimizers under DDP (gloo, 2 and 3 processes) against the single-process run on
the same global batch: MomentumLBFGS with sharded curvature, Neumann unchanged."""

import io
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
from torch.nn.parallel import DistributedDataParallel as DDP

from secant import MomentumLBFGS, Neumann

GLOBAL_BATCH = 24
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, history_size=3, update_period=2, beta=0.8,
          blocks="tensor")  # several blocks, so that curvature is sharded over the ranks
CURVATURE = ("param_ema", "grad_ema", "param_snapshot", "grad_snapshot", "history", "gram")
OPTIMIZERS = {
    "mlbfgs": lambda p: MomentumLBFGS(p, **HP),
    "mlbfgs-kl_clip": lambda p: MomentumLBFGS(p, **HP, step_rule="kl_clip"),
    "mlbfgs-one_block": lambda p: MomentumLBFGS(p, **{**HP, "blocks": "group"}),
    "neumann": lambda p: Neumann(p, lr=0.05, burn_in_steps=2, reset_period=3),
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).double()


def batch(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen, dtype=torch.float64)
    return x, x.flip(1).sin()


def train(net, opt, steps, start=0, rank=0, world=1):
    for t in range(start, start + steps):
        x, y = batch(t)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        opt.zero_grad()
        nn.functional.mse_loss(net(x[shard]), y[shard]).backward()
        opt.step()


def curvature_bytes(opt):
    st = opt.state.get("mlbfgs")
    return sum(st[k].numel() * st[k].element_size() for k in CURVATURE) if st else 0


def _worker_match(rank, world, out_dir, steps, name):
    net = DDP(model())
    opt = OPTIMIZERS[name](net.parameters())
    train(net, opt, steps, rank=rank, world=world)
    diag = opt.diagnostics() if name.startswith("mlbfgs") else {}  # a collective
    torch.save({"params": [p.detach() for p in net.parameters()], "diag": diag,
                "curvature": curvature_bytes(opt)}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world,name", [(2, "mlbfgs"), (3, "mlbfgs"), (2, "mlbfgs-kl_clip"),
                                        (3, "mlbfgs-one_block"), (2, "neumann")])
def test_multi_rank_run_matches_single_process(tmp_path, world, name):
    steps = 12
    spawn(world, _worker_match, str(tmp_path), steps, name)
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    train(net, opt, steps)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for res in results:
        for p, q in zip(res["params"], net.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
    if name.startswith("mlbfgs"):
        assert opt.diagnostics()["pairs_accepted"] > 0
        single = opt.diagnostics()
        for res in results:  # every rank reports all blocks, gathered from the ranks
            assert res["diag"].keys() == single.keys()
            for key, value in single.items():
                assert res["diag"][key] == pytest.approx(value, rel=1e-8, nan_ok=True), key
    if name == "mlbfgs-one_block":  # one block, three ranks: two ranks own nothing
        assert sorted(r["curvature"] for r in results)[:2] == [0, 0]
    elif name.startswith("mlbfgs"):
        assert max(r["curvature"] for r in results) <= 0.6 * curvature_bytes(opt)


def _worker_resume(rank, world, out_dir):
    full = DDP(model())
    opt = MomentumLBFGS(full.parameters(), **HP)
    train(full, opt, 14, rank=rank, world=world)

    part = DDP(model())
    opt1 = MomentumLBFGS(part.parameters(), **HP)
    train(part, opt1, 6, rank=rank, world=world)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)  # per rank: each rank saves its own shard
    buf.seek(0)
    resumed = DDP(model())
    resumed.module.load_state_dict(part.module.state_dict())
    opt2 = MomentumLBFGS(resumed.parameters(), **HP)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    train(resumed, opt2, 8, start=6, rank=rank, world=world)
    same = all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    torch.save(same, os.path.join(out_dir, f"rank{rank}.pt"))


def test_sharded_resume_is_exact(tmp_path):
    spawn(2, _worker_resume, str(tmp_path))
    assert all(torch.load(tmp_path / f"rank{r}.pt") for r in range(2))


def _worker_mismatch(rank, world, out_dir):
    hidden = 16 if rank == 0 else 17
    net = nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, 2))
    try:
        MomentumLBFGS(net.parameters())
        outcome = "no error"
    except ValueError as err:
        outcome = str(err)
    dist.barrier()
    torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_with_different_parameters_fail_loudly(tmp_path):
    spawn(2, _worker_mismatch, str(tmp_path))
    for r in range(2):
        assert "ranks disagree" in torch.load(tmp_path / f"rank{r}.pt")


def test_loading_another_ranks_shard_is_refused():
    """A rank's checkpoint lacks the blocks other ranks keep (here: one block's history)."""
    opt = MomentumLBFGS(model().parameters(), blocks="tensor")
    sd = opt.state_dict()
    del sd["state"][1]["history"]
    with pytest.raises(ValueError, match="no 'history'.*another rank"):
        MomentumLBFGS(model().parameters(), blocks="tensor").load_state_dict(sd)


def _worker_dcp_save(rank, world, out_dir, name):
    net = DDP(model())
    opt = OPTIMIZERS[name](net.parameters())
    train(net, opt, 6, rank=rank, world=world)
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=os.path.join(out_dir, "ckpt"))


def _worker_dcp_load(rank, world, out_dir, name):
    net = DDP(model())
    opt = OPTIMIZERS[name](net.parameters())
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    train(net, opt, 8, start=6, rank=rank, world=world)
    torch.save([p.detach() for p in net.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name,save_world,load_world", [("mlbfgs", 2, 3), ("neumann", 2, 2)])
def test_dcp_resume_is_exact(tmp_path, name, save_world, load_world):
    """DCP under DDP: MomentumLBFGS's blocks are kept by different ranks (each block's state
    is in its owner's entries), saved on 2 ranks and resumed on 3, which own other blocks."""
    spawn(save_world, _worker_dcp_save, str(tmp_path), name)
    spawn(load_world, _worker_dcp_load, str(tmp_path), name)
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    train(net, opt, 14)
    for r in range(load_world):
        for p, q in zip(torch.load(tmp_path / f"rank{r}.pt", weights_only=True),
                        net.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
