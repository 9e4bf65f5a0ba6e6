"""FSDP2 (``fully_shard``) training under ``torchrun`` with any secant optimizer, and a
``torch.distributed.checkpoint`` (DCP) save and resume halfway: each rank holds a shard of
every weight and of its gradient (MomentumLBFGS and Neumann: of their state too; the layer
optimizers split their curvature state by layers over the ranks); the result equals one process on
the global batch, and the checkpoint loads on any number of ranks (gloo on CPU, NCCL on GPUs).

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_torchrun.py --checkpoint ckpt
    torchrun --standalone --nproc-per-node 4 examples/fsdp2_torchrun.py --replicas 2  # HSDP
"""

import argparse
import gc

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import secant

OPTIMIZERS = {  # over the sharded model
    "mlbfgs": lambda m: secant.MomentumLBFGS(m.parameters(), lr=0.1, update_period=10),
    "neumann": lambda m: secant.Neumann(m.parameters(), lr=0.1),
    "kfac": lambda m: secant.KFAC(m, lr=0.01, damping=0.03),
    "kbfgs": lambda m: secant.KBFGS(m, lr=0.1, damping=0.3),
}


def build(args: argparse.Namespace, device: torch.device):
    """The model sharded by FSDP2 (HSDP with ``--replicas`` > 1), then its optimizer."""
    world = dist.get_world_size()
    if args.replicas > 1:
        mesh = init_device_mesh(device.type, (args.replicas, world // args.replicas),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 10)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, OPTIMIZERS[args.optimizer](model)  # after fully_shard


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world or world % args.replicas:
        raise SystemExit(f"--batch {args.batch} and the {world} ranks must be multiples of "
                         f"the ranks and of --replicas {args.replicas}")
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                          if torch.cuda.is_available() else "cpu")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(y, device=device)
    model, opt = build(args, device)
    gen = torch.Generator().manual_seed(0)  # the same global batch on every rank
    share = args.batch // world
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        mine = idx[rank * share: (rank + 1) * share].to(device)

        def closure(xb=x[mine], yb=y[mine], model=model, opt=opt):  # K-BFGS: called twice
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        loss = opt.step(closure)
        if rank == 0 and (step == 1 or step % max(1, args.steps // 6) == 0):
            print(f"step {step}: rank-0 loss {float(loss.detach()):.4f}")
        if args.checkpoint and step == args.steps // 2:
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=args.checkpoint)
            # what a restarted job does (on any number of ranks): build, then load
            model, opt = build(args, device)
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=args.checkpoint)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            if rank == 0:
                print(f"step {step}: saved to and resumed from {args.checkpoint}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="mlbfgs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--replicas", type=int, default=1, help="HSDP: replica groups")
    ap.add_argument("--checkpoint", help="a folder: DCP save and resume halfway")
    args = ap.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args)
    # FSDP2's modules hold their device mesh's process groups in reference cycles: free them
    # now, or a gloo worker thread still releasing a buffer meets interpreter exit (SIGABRT,
    # "terminate called without an active exception", in about 1 run of 3 without this line).
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
