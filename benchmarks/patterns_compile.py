"""Eager vs ``torch.compile`` for K-FAC training steps on a small MLP (docs/patterns.md).

Interleaved rounds of 20 K-FAC steps (``factor_update_period = inverse_update_period = P``,
default 10: 2 capture steps of 20) in eager mode and with the compiled model (inductor), and the
same for SGD without hooks as the machine's compile baseline; reports median times per round.
One torch thread. Run: ``python benchmarks/patterns_compile.py [P]``.
"""

import statistics
import time

import torch
import torch._dynamo as dynamo
import torch._dynamo.utils as dynamo_utils
import torch.nn.functional as F
from torch import nn

from secant import KFAC


def model_and_data(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 10))
    return model, torch.randn(128, 64), torch.randint(0, 10, (128,))


def run(model, fwd, x, y, opt, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
    return time.perf_counter() - t


def main(rounds: int = 5, steps: int = 20, period: int = 10) -> None:
    torch.set_num_threads(1)
    eager_m, x, y = model_and_data(0)
    comp_m, _, _ = model_and_data(0)
    kw = dict(lr=0.05, factor_update_period=period, inverse_update_period=period)
    eager_opt, comp_opt = KFAC(eager_m, **kw), KFAC(comp_m, **kw)
    compiled = torch.compile(comp_m)
    sgd_e, _, _ = model_and_data(0)
    sgd_c, _, _ = model_and_data(0)
    sgd_compiled = torch.compile(sgd_c)
    opt_e = torch.optim.SGD(sgd_e.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(sgd_c.parameters(), lr=0.05)
    run(sgd_c, sgd_compiled, x, y, opt_c, 2)
    dynamo_utils.counters.clear()
    t0 = time.perf_counter()
    run(comp_m, compiled, x, y, comp_opt, steps)  # compile both variants (capture on / off)
    compile_s = time.perf_counter() - t0
    run(eager_m, eager_m, x, y, eager_opt, steps)
    eager, comp, s_e, s_c = [], [], [], []
    for _ in range(rounds):
        eager.append(run(eager_m, eager_m, x, y, eager_opt, steps))
        comp.append(run(comp_m, compiled, x, y, comp_opt, steps))
        s_e.append(run(sgd_e, sgd_e, x, y, opt_e, steps))
        s_c.append(run(sgd_c, sgd_compiled, x, y, opt_c, steps))
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    print(f"torch {torch.__version__}, {rounds} interleaved rounds of {steps} K-FAC steps")
    print(f"eager    median {statistics.median(eager):.3f} s / round")
    print(f"compiled median {statistics.median(comp):.3f} s / round "
          f"(first round incl. compilation {compile_s:.1f} s)")
    print(f"ratio compiled/eager {statistics.median(comp) / statistics.median(eager):.2f}; "
          f"graph breaks counted by dynamo: {breaks} (all on capture steps)")
    se, sc = statistics.median(s_e), statistics.median(s_c)
    print(f"SGD (no hooks) eager {se:.3f} s, compiled {sc:.3f} s, ratio {sc / se:.2f}")
    dynamo.reset()


if __name__ == "__main__":
    import sys
    main(period=int(sys.argv[1]) if len(sys.argv) > 1 else 10)
