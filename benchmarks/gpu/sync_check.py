"""Two GPU checks of every secant optimizer, eager and ``compile=True``, on a small MLP:

* **no host sync**: after warm-up steps (which compile, fill K-BFGS(L)'s ring and pass
  MomentumLBFGS's SGD phase), the steady-state steps run under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises at any call that synchronises the
  host with the device (a ``.item()``, a device-to-host copy, a copy from pageable memory);
* **compiled equals eager**: the parameters after the same steps, at float32 tolerance.

    python benchmarks/gpu/sync_check.py                  # on a GPU, well under a minute
    python benchmarks/gpu/sync_check.py --device cpu     # plumbing check (no sync check)

Prints one line per optimizer and mode and exits 1 if any check fails. K-FAC runs with
Cholesky inverses and an inverse update period longer than the run (its eigen path's
``torch.linalg.eigh`` checks its own convergence on the host, documented). Not yet run on a
GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import secant

STEPS, WARMUP = 12, 30


def optimizers() -> dict:
    """name: (builder over the model, whether it is a layer optimizer)."""
    return {
        "kfac": lambda m, c: secant.KFAC(m, lr=0.01, damping=0.03, inverse_method="cholesky",
                                         inverse_update_period=1000, compile=c),
        "kbfgs": lambda m, c: secant.KBFGS(m, lr=0.1, damping=0.3, compile=c),
        "kbfgsl": lambda m, c: secant.KBFGSL(m, lr=0.1, damping=0.3, history_size=4,
                                             compile=c),
        "mlbfgs": lambda m, c: secant.MomentumLBFGS(m.parameters(), lr=0.03, update_period=5,
                                                    compile=c),
        "neumann": lambda m, c: secant.Neumann(m.parameters(), lr=0.01, compile=c),
    }


def run(name: str, compile: bool, device: str) -> tuple[torch.Tensor, str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(),
                          nn.Linear(32, 10)).to(device)
    opt = optimizers()[name](model, compile)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 20, generator=gen).to(device),
             torch.randint(0, 10, (64,), generator=gen).to(device)) for _ in range(4)]

    def step(k: int) -> None:
        x, y = data[k % len(data)]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    for k in range(WARMUP):
        step(k)
    verdict = "no sync check on a CPU"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(WARMUP, WARMUP + STEPS):
                step(k)
            verdict = "no host sync"
        except RuntimeError as e:
            verdict = f"HOST SYNC: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        for k in range(WARMUP, WARMUP + STEPS):
            step(k)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu(), verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--optimizers", default=",".join(optimizers()))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")
    failed = False
    for name in args.optimizers.split(","):
        eager, v_eager = run(name, False, args.device)
        compiled, v_comp = run(name, True, args.device)
        close = torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
        gap = (compiled - eager).abs().max().item()
        failed |= "HOST SYNC" in v_eager + v_comp or not close
        print(f"{name:8s} eager: {v_eager}; compiled: {v_comp}; compiled vs eager: max "
              f"|Δθ| {gap:.2e} ({'ok' if close else 'DIFFERS'})", flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
