"""Data-parallel training under ``torchrun`` with any secant optimizer: each rank takes its share
of the global batch; the curvature state is sharded over the ranks, and the result equals one
process on the global batch (gloo on CPU, NCCL on GPUs).

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --optimizer kbfgs
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import secant

OPTIMIZERS = {
    "kfac": lambda m: secant.KFAC(m, lr=0.1, damping=0.1),
    "kbfgs": lambda m: secant.KBFGS(m, lr=0.1, damping=0.3),
    "mlbfgs": lambda m: secant.MomentumLBFGS(m.parameters(), lr=0.1, update_period=10),
    "neumann": lambda m: secant.Neumann(m.parameters(), lr=0.1),
}


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                          if torch.cuda.is_available() else "cpu")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(y, device=device)
    torch.manual_seed(0)  # the same initial model on every rank
    model = DDP(nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(device))
    opt = OPTIMIZERS[args.optimizer](model)
    gen = torch.Generator().manual_seed(0)  # the same global batch on every rank
    share = args.batch // world
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y), (args.batch,), generator=gen)
        mine = idx[rank * share: (rank + 1) * share].to(device)

        def closure(mine=mine):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[mine]), y[mine])
            loss.backward()
            return loss

        loss = opt.step(closure)
        if rank == 0 and (step == 1 or step % max(1, args.steps // 6) == 0):
            print(f"step {step}: rank-0 loss {float(loss.detach()):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="kbfgs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    args = ap.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args)
    # Destroy the group once the model and optimizer are gone (here: train() has returned), so
    # that this call frees it; a DDP model still alive would free it later, under the GIL,
    # while gloo's threads may still need the GIL to release their last buffers.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
