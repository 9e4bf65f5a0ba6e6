"""Layer optimizers (K-FAC, K-BFGS, K-BFGS(L)) under DDP with gloo on 2 and 3 processes, against
the single-process run on the same global batch; sharded (per-rank) and DCP resume; mismatch
errors.

One spawn per world size runs every case (each spawn costs seconds); the tests read its results.
"""

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

from secant import KBFGS, KBFGSL, KFAC
from secant.distributed import all_reduce_flat

GLOBAL_BATCH = 12
STEPS = 5


def conv_model():
    """Four layers, one of them a Conv2d, ownership spread over 2 or 3 ranks; a LayerNorm for
    the first-order fallback group."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(48, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8),
                         nn.Tanh(), nn.Linear(8, 4)).double()


def small_model():
    """Two layers: on 3 ranks one rank owns none."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(step, small):
    gen = torch.Generator().manual_seed(100 + step)
    shape = (GLOBAL_BATCH, 6) if small else (GLOBAL_BATCH, 2, 4, 4)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    flat = x.flatten(1)
    y = flat[:, :3].cos() if small else flat[:, 3:7].sin()
    return x, y


KFAC_HP = dict(lr=0.05, damping=0.01, weight_decay=1e-3, factor_update_period=1,
               inverse_update_period=2, kl_clip=1e-2)
KBFGS_HP = dict(lr=0.1, damping=0.3, weight_decay=1e-3)
CASES = {
    "kfac": (False, lambda m, **kw: KFAC(m, **KFAC_HP, **kw)),
    "kfac-cholesky": (False, lambda m, **kw: KFAC(
        m, **{**KFAC_HP, "factor_update_period": 2, "inverse_update_period": 3},
        inverse_method="cholesky", **kw)),
    "kfac-exact": (False, lambda m, **kw: KFAC(m, **KFAC_HP, damping_mode="exact", **kw)),
    "kfac-communication": (False, lambda m, **kw: KFAC(
        m, **KFAC_HP, distributed_mode="communication", **kw)),
    "kfac-exact-communication": (False, lambda m, **kw: KFAC(
        m, **KFAC_HP, damping_mode="exact", distributed_mode="communication", **kw)),
    "kfac-small": (True, lambda m, **kw: KFAC(m, **KFAC_HP, **kw)),
    "kbfgs": (False, lambda m, **kw: KBFGS(m, **KBFGS_HP, **kw)),
    "kbfgsl": (False, lambda m, **kw: KBFGSL(m, **KBFGS_HP, history_size=3, **kw)),
    "kbfgs-communication": (False, lambda m, **kw: KBFGS(
        m, **KBFGS_HP, distributed_mode="communication", **kw)),
    "kbfgs-warm": (False, lambda m, **kw: KBFGS(m, **KBFGS_HP, **kw)),
    "kbfgsl-small": (True, lambda m, **kw: KBFGSL(m, **KBFGS_HP, history_size=2, **kw)),
}
# state entries only the owner of a layer keeps (memory mode), and the per-step inverses
OWNER_KEYS = ("A", "H_g", "hist_z")
INVERSE_KEYS = ("A_inv", "Q_A", "H_a", "H_g", "hist_z")


def warm_start(name, opt, rank=0, world=1):
    """``-warm`` cases: K-BFGS warm start on each rank's share of two batches."""
    if name.endswith("-warm"):
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        assert opt.warm_start([batch(t, CASES[name][0])[0][shard] for t in (50, 51)]) == 2


def build(name, wrap):
    small, make = CASES[name]
    net = small_model() if small else conv_model()
    model = DDP(net) if wrap else net
    return model, make(model)


def train(model, opt, small, steps, start=0, rank=0, world=1, average_grads=False):
    """``average_grads``: average the gradients with one fixed all-reduce instead of DDP."""
    for t in range(start, start + steps):
        x, y = batch(t, small)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

        def closure(x=x[shard], y=y[shard]):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if average_grads:  # K-BFGS's second pass computes no parameter gradient
                params = [p for p in model.parameters() if p.grad is not None]
                for p, g in zip(params, all_reduce_flat([p.grad for p in params],
                                                        dist.group.WORLD, average=True)):
                    p.grad.copy_(g)
            return loss

        opt.step(closure)


def count_layers_with(opt, keys):
    return sum(any(k in ls for k in keys) for ls in opt.state[opt.state_key]["layers"])


def _resume_is_exact(name, rank, world):
    # Gradients averaged by one fixed all-reduce, not DDP: DDP rebuilds its buckets after its
    # first iteration, which changes the summation order of 3-rank gradient sums between an
    # uninterrupted and a resumed run (the last bits, not the optimizer's state, would differ).
    small = CASES[name][0]
    kw = dict(rank=rank, world=world, average_grads=True)
    full, opt = build(name, False)
    train(full, opt, small, 6, **kw)
    part, opt1 = build(name, False)
    train(part, opt1, small, 3, **kw)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)  # per rank: each rank saves its own shard
    buf.seek(0)
    resumed, opt2 = build(name, False)
    resumed.load_state_dict(part.state_dict())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    train(resumed, opt2, small, 3, start=3, **kw)
    return all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


def _mismatch(rank, make):
    try:
        make(rank)
        outcome = "no error"
    except ValueError as err:
        outcome = str(err)
    dist.barrier()
    return outcome


def _worker(rank, world, out_dir):
    out = {"runs": {}, "resume": {}, "mismatch": {}}
    for name in CASES:
        model, opt = build(name, True)
        warm_start(name, opt, rank, world)
        train(model, opt, CASES[name][0], STEPS, rank=rank, world=world)
        out["runs"][name] = {"params": [p.detach().clone() for p in model.parameters()],
                             "owned": count_layers_with(opt, OWNER_KEYS),
                             "inverses": count_layers_with(opt, INVERSE_KEYS),
                             "layers": len(opt.layers)}
    for name in ("kfac", "kfac-communication", "kbfgs", "kbfgsl-small"):
        out["resume"][name] = _resume_is_exact(name, rank, world)
    out["mismatch"]["model"] = _mismatch(rank, lambda r: KFAC(nn.Sequential(
        nn.Linear(4, 6 + r), nn.Linear(6 + r, 2))))
    out["mismatch"]["options"] = _mismatch(rank, lambda r: KBFGSL(
        small_model(), history_size=3 + r))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


_RESULTS = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The single-process references are tiny: extra threads only contend with the ranks."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=[2, 3])
def world_results(request, tmp_path_factory):
    world = request.param
    if world not in _RESULTS:
        out_dir = tmp_path_factory.mktemp(f"world{world}")
        spawn(world, _worker, str(out_dir))
        _RESULTS[world] = [torch.load(out_dir / f"rank{r}.pt", weights_only=True)
                           for r in range(world)]
    return world, _RESULTS[world]


@pytest.mark.parametrize("name", list(CASES))
def test_multi_rank_run_matches_single_process(world_results, name):
    world, results = world_results
    model, opt = build(name, False)
    before = [p.detach().clone() for p in model.parameters()]
    warm_start(name, opt)
    train(model, opt, CASES[name][0], STEPS)
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), before)) > 1e-3
    if name.startswith("kbfgs"):
        assert opt.diagnostics()["g_pairs_accepted"] > 0
    for res in results:
        run = res["runs"][name]
        for p, q in zip(run["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
    runs = [res["runs"][name] for res in results]
    layers = runs[0]["layers"]
    if name.endswith("communication") and name.startswith("kbfgs"):
        assert [r["owned"] for r in runs] == [layers] * world  # replicated curvature
    else:  # every layer's factors / BFGS state on exactly one rank
        assert sum(r["owned"] for r in runs) == layers
        assert max(r["owned"] for r in runs) < layers
    if name.endswith("communication"):
        assert [r["inverses"] for r in runs] == [layers] * world
    else:
        assert sum(r["inverses"] for r in runs) == layers
    if name.endswith("small") and world == 3:
        assert sorted(r["owned"] for r in runs) == [0, 1, 1]


def test_sharded_resume_is_exact(world_results):
    _, results = world_results
    for res in results:
        assert res["resume"] and all(res["resume"].values()), res["resume"]


def test_ranks_that_disagree_fail_loudly(world_results):
    _, results = world_results
    for res in results:
        assert "ranks disagree on the layers" in res["mismatch"]["model"]
        assert "KBFGSL options" in res["mismatch"]["options"]


@pytest.mark.parametrize("name", ["kfac", "kbfgs"])
def test_loading_another_ranks_state_is_refused(name):
    """As rank 1 of 2 would save it in memory mode: without the first layer, which rank 0
    owns."""
    _, opt = build(name, False)
    sd = opt.state_dict()
    sd["state"][0] = {k: v for k, v in sd["state"][0].items() if "_optimizer_" in k}
    sd["state"][0][opt.state_key + "_optimizer_shard"] = [1, 2]
    with pytest.raises(ValueError, match="each rank loads its own"):
        build(name, False)[1].load_state_dict(sd)


def _worker_dcp(rank, world, out_dir, name, save):
    """Under DDP: train 3 steps and ``dcp.save``, or build afresh, ``dcp.load`` and train the
    remaining steps."""
    small = CASES[name][0]
    model, opt = build(name, True)
    ckpt = os.path.join(out_dir, "ckpt")
    if save:
        train(model, opt, small, 3, rank=rank, world=world)
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
        return
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, small, STEPS - 3, start=3, rank=rank, world=world)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name,save_world,load_world", [("kfac", 2, 3), ("kbfgsl", 3, 2)])
def test_dcp_resume_under_ddp_is_exact(tmp_path, name, save_world, load_world):
    """A DCP checkpoint of a DDP run resumes on another number of ranks, whose ranks own other
    layers (memory mode: a layer's state is in its owner's entries only), equal to one
    process's uninterrupted run."""
    spawn(save_world, _worker_dcp, str(tmp_path), name, True)
    spawn(load_world, _worker_dcp, str(tmp_path), name, False)
    net, opt = build(name, False)
    train(net, opt, CASES[name][0], STEPS)
    for r in range(load_world):
        for p, q in zip(torch.load(tmp_path / f"rank{r}.pt", weights_only=True),
                        net.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
