"""A small CNN with BatchNorm trained by ``MomentumLBFGS`` on scikit-learn's digits (ships with
the package), with a cosine learning-rate schedule and checkpointing of model and optimizer.

    python examples/cnn_mlbfgs.py --steps 600
"""

import argparse
import io

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import secant


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 16, 10))


def optimizer(net: nn.Module) -> secant.MomentumLBFGS:
    return secant.MomentumLBFGS(net.parameters(), lr=0.1, weight_decay=5e-4, update_period=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = model()
    opt = optimizer(net)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % max(1, args.steps // 6) == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    buf = io.BytesIO()  # a checkpoint, as to a file: both state dicts, loaded weights-only
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = model()
    resumed.load_state_dict(ckpt["model"])
    optimizer(resumed).load_state_dict(ckpt["opt"])
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    print(f"training accuracy {acc:.3f}; checkpoint saved and loaded")


if __name__ == "__main__":
    main()
