"""Which MomentumLBFGS defaults make its curvature count? Steps-to-target on the harness problems.

Each method runs on the harness's problems (``secant.bench.problems``: data, model, loss and
batch size as there) for a fixed number of steps, once per seed and learning rate; the
full-training-set loss is evaluated every ``EVAL_EVERY`` steps. Reported per problem x method:

* the best LR of its grid (lowest median steps-to-target over seeds, ties broken by the median
  final loss); a grid whose best point is on an edge is extended by one point on that side
  until the best is interior or the new point diverges;
* steps-to-target at that LR (median [min-max] over seeds; "-" = not reached in the budget);
* the median final loss; the number of diverged LRs on the grid (non-finite, or above the
  initial loss at the end).

Targets are fixed in advance (``TARGETS``): the loss that SGD with momentum at its best LR
reached at about 2/3 of the step budget in a pilot on seed 99, which is not an evaluation seed.

Baselines: SGD with momentum 0.9, SGD with momentum 0.9 on the globally normalised gradient
``g/||g||`` (the mL-BFGS authors' baseline) and Adam. mL-BFGS variants are options of
:class:`secant.MomentumLBFGS`, plus two rules tried here through a small subclass: one
``gamma`` shared by all blocks and scale-free damping bounds (see ``Variant``).

Run (one thread, resumable: results are cached in ``mlbfgs_defaults.json`` beside this file):
    python benchmarks/mlbfgs_defaults.py [--methods a,b] [--problems p,q] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from secant import MomentumLBFGS
from secant.bench.problems import get_problem, seeded_model
from secant.linalg import block_dot, push, tau_coefficient
from secant.optim import momentum_lbfgs as mlbfgs_module

CACHE = Path(__file__).with_suffix(".json")
EVAL_EVERY = 10
STEPS = {"digits": 1500, "digits-clf": 1500, "quadratic": 1000, "curves": 600, "mnist1d": 1500}
# From the SGD pilot (--pilot, seed 99): loss at 2/3 of the budget at SGD's best LR (digits
# 18.59 at lr 0.01; quadratic 241.44 at lr 0.00316, minimum 240.43; digits-clf 4.5e-5 at lr
# 0.316, rounded up to 1e-4, reached there at ~45% of the budget; mnist1d 0.0806 at lr 0.1,
# rounded to 0.08), then frozen.
TARGETS = {"digits": 18.6, "digits-clf": 1e-4, "quadratic": 241.5, "curves": math.nan,
           "mnist1d": 0.08}
LR_LADDER = [10.0 ** (k / 2) for k in range(-10, 3)]  # 1e-5, 3.2e-5, ..., 1, 3.2, 10


# ------------------------------------------------------------------------------ methods
class NormalizedSGD(torch.optim.SGD):
    """torch.optim.SGD (heavy-ball momentum) on the globally normalised gradient g/||g||."""

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_div_(grads, norm.clamp(min=1e-30))
        return super().step(closure)


class Variant(MomentumLBFGS):
    """MomentumLBFGS with experimental rules (the library code is not changed).

    * ``gamma="shared"``: ``H0 = gamma I`` with one ``gamma = sum_b s_b'y_b / sum_b y_b'y_b``
      over the blocks' newest pairs instead of one ``gamma`` per block.
    * ``damping_scale="relative"``: the bounds apply to ``r / c`` with ``c = ||y|| / ||s||`` of
      the pair (so to the cosine of s and y) and ``s`` is mixed in at that scale,
      ``y_hat = tau y + (1 - tau) c s``: invariant to rescaling the loss, unlike the paper's
      absolute bounds on ``s'y / s's``.
    * ``scale="gtd"``: the quasi-Newton direction ``d`` is scaled by ``g'g / g'd`` (the step
      decreases the linear model as much as SGD's); ``||g|| / ||d||`` where ``g'd <= 0``.
    * ``warmup="normalized"`` (with ``step_rule="unit"``): normalised SGD before the first pair
      instead of SGD, so ``lr`` is a step length from the first step (normalised SGD +
      curvature).
    """

    def __init__(self, params, gamma="block", damping_scale="absolute", scale=None,
                 warmup="sgd", **kw):
        super().__init__(params, **kw)
        self.gamma_mode = gamma
        self.damping_scale = damping_scale
        self.scale, self.warmup = scale, warmup

    def _precondition(self, d):
        if self.scale is None:
            return super()._precondition(d)
        rows = self._layout.curvature_rows
        g = d[:rows].clone()
        rule, self.step_rule = self.step_rule, "none"
        try:
            super()._precondition(d)
        finally:
            self.step_rule = rule
        q = d[:rows]
        gg, gd = (g * g).sum(), (g * q).sum()
        norm_factor = gg.sqrt() / torch.linalg.vector_norm(q).clamp(min=1e-300)
        d.mul_(torch.where(gd > 0, gg / gd.clamp(min=1e-300), norm_factor))

    def _update_curvature(self, t, g_own, ok):
        """``warmup="normalized"``: before the first pair (steps 1..2T-1) the direction is the
        gradient divided by its global norm (after the averages took the raw gradient), so the
        warm-up is normalised SGD. ``g_own`` is a view of the whole direction buffer in a
        single process; weight decay is 0 in these runs."""
        super()._update_curvature(t, g_own, ok)
        if self.warmup == "normalized" and t < 2 * self.update_period:
            g_own.div_(torch.linalg.vector_norm(g_own).clamp(min=torch.finfo(g_own.dtype).tiny))

    def step(self, closure=None):
        if self.gamma_mode == "block":
            return super().step(closure)
        original = mlbfgs_module.newest_gamma

        def shared(h):
            per_block = original(h)
            m = h.size
            j = (h.head - 1) % m
            b = torch.arange(h.num_blocks)
            ok = h.count > 0
            sy = torch.where(ok, h.gram[b, j, j + m], 0.0).sum()
            yy = torch.where(ok, h.gram[b, j + m, j + m], 0.0).sum()
            return torch.where(ok.any() & (yy > 0), sy / yy.clamp(min=1e-300), per_block)\
                .expand_as(per_block)

        mlbfgs_module.newest_gamma = shared
        try:
            return super().step(closure)
        finally:
            mlbfgs_module.newest_gamma = original

    def _form_pair(self, ok):
        if self.damping_scale == "absolute" or self.pair_momentum > 0:
            return super()._form_pair(ok)
        st = self.state["mlbfgs"]
        h = self._history()
        s = st["param_ema"] - st["param_snapshot"]
        y = st["grad_ema"] - st["grad_snapshot"]
        ss = block_dot(s, s, h.chunk_block, h.num_blocks)
        sy = block_dot(s, y, h.chunk_block, h.num_blocks)
        yy = block_dot(y, y, h.chunk_block, h.num_blocks)
        c = (yy / ss).sqrt()
        tau, active = tau_coefficient(sy, c * ss, self.sigma_low, self.sigma_high, self.tau_max)
        attempt = st["has_snapshot"] & ok
        accept = torch.isfinite(tau) & (ss > 0) & (yy > 0) & attempt
        t = torch.where(accept, tau, 0.0)[h.chunk_block].unsqueeze(1)
        cs = torch.where(accept, c, 0.0)[h.chunk_block].unsqueeze(1)
        push(h, s, t * y + (1.0 - t) * cs * s, accept)
        st["pairs_accepted"] += accept
        st["pairs_rejected"] += attempt & ~accept
        st["damping_activations"] += accept & active


def mlb(**kw):
    return lambda params, lr: Variant(params, lr=lr, **kw)


# name -> (factory(params, lr), initial LR grid)
SGD_GRID = [1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1]
NORM_GRID = [3.16e-3, 1e-2, 3.16e-2, 0.1, 0.316]
METHODS = {
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), SGD_GRID),
    "nsgd": (lambda p, lr: NormalizedSGD(p, lr=lr, momentum=0.9), NORM_GRID),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr), [3.16e-4, 1e-3, 3.16e-3, 1e-2]),
    # the library defaults before this study (per-tensor blocks; paper's beta, T, sigma bounds)
    "mlb-tensor": (mlb(blocks="tensor"), SGD_GRID),
    "mlb-b0.9-T20": (mlb(blocks="tensor", beta=0.9, update_period=20), SGD_GRID),
    "mlb-group": (mlb(blocks="group"), SGD_GRID),
    "mlb-group-b0.9-T20": (mlb(blocks="group", beta=0.9, update_period=20), SGD_GRID),
    "mlb-group-b0.99-T20": (mlb(blocks="group", beta=0.99, update_period=20), SGD_GRID),
    "mlb-shared-gamma": (mlb(blocks="tensor", gamma="shared"), SGD_GRID),
    "mlb-unit-group": (mlb(blocks="group", step_rule="unit"), NORM_GRID),
    "mlb-rel": (mlb(blocks="tensor", damping_scale="relative"), SGD_GRID),
    "mlb-rel-group": (mlb(damping_scale="relative", blocks="group"), SGD_GRID),
    "mlb-rel-shared": (mlb(blocks="tensor", damping_scale="relative", gamma="shared"),
                       SGD_GRID),
    "mlb-sH1e6-group": (mlb(sigma_high=1e6, blocks="group"), SGD_GRID),
    "mlb-gtd-group": (mlb(blocks="group", scale="gtd"), SGD_GRID),
    "mlb-normalized": (mlb(blocks="group", step_rule="unit", warmup="normalized"), NORM_GRID),
    "mlb-gtd-sH1e6-group": (mlb(blocks="group", scale="gtd", sigma_high=1e6), SGD_GRID),
    "mlb-unit-sH1e6-group": (mlb(blocks="group", step_rule="unit", sigma_high=1e6), NORM_GRID),
}


# ------------------------------------------------------------------------------ one run
def run(problem_name: str, method: str, lr: float, seed: int) -> dict:
    problem = get_problem(problem_name)
    data = problem.load(None, False)
    x, y = data.x_train, data.y_train
    model = seeded_model(problem, seed)
    opt = METHODS[method][0](model.parameters(), lr)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(problem.loss(model, x, y))

    curve = [full_loss()]
    for step in range(1, STEPS[problem_name] + 1):
        idx = torch.randint(0, len(x), (problem.batch_size,), generator=gen)
        opt.zero_grad()
        problem.loss(model, x[idx], None if y is None else y[idx]).backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            curve.append(full_loss())
            if not math.isfinite(curve[-1]) or curve[-1] > 10 * curve[0]:
                break
    final = curve[-1]
    diverged = not math.isfinite(final) or final > curve[0]
    return {"curve": curve, "final": final, "diverged": diverged}


def steps_to(curve: list[float], target: float) -> float:
    for i, v in enumerate(curve):
        if v <= target:
            return i * EVAL_EVERY
    return math.inf


# ------------------------------------------------------------------------------ grid search
class Study:
    def __init__(self, path: Path = CACHE, cached_only: bool = False):
        self.path = path
        self.db = json.loads(path.read_text()) if path.exists() else {}
        self.cached_only = cached_only

    def get(self, problem: str, method: str, lr: float, seed: int) -> dict:
        key = f"{problem}|{method}|{lr:.4g}|{seed}"
        if key not in self.db:
            if self.cached_only:
                raise KeyError(key)
            t0 = time.perf_counter()
            self.db[key] = run(problem, method, lr, seed)
            self.db[key]["seconds"] = time.perf_counter() - t0
            self.path.write_text(json.dumps(self.db))
        return self.db[key]

    def score(self, problem, method, lr, seeds):
        runs = [self.get(problem, method, lr, s) for s in seeds]
        target = TARGETS[problem]
        steps = [steps_to(r["curve"], target) for r in runs]
        finals = [r["final"] if math.isfinite(r["final"]) else math.inf for r in runs]
        return {"lr": lr, "steps": steps, "median_steps": statistics.median(steps),
                "median_final": statistics.median(finals),
                "diverged": any(r["diverged"] for r in runs)}

    def search(self, problem, method, seeds):
        grid = sorted(METHODS[method][1])
        scores = {lr: self.score(problem, method, lr, seeds) for lr in grid}
        while True:
            best = min(scores.values(), key=lambda s: (s["median_steps"], s["median_final"]))
            lrs = sorted(scores)
            i = lrs.index(best["lr"])
            if 0 < i < len(lrs) - 1:
                break
            edge = lrs[0] if i == 0 else lrs[-1]
            k = min(range(len(LR_LADDER)), key=lambda j: abs(math.log(LR_LADDER[j] / edge)))
            k = k - 1 if i == 0 else k + 1
            if not 0 <= k < len(LR_LADDER):
                break
            new = LR_LADDER[k]
            scores[new] = self.score(problem, method, new, seeds)
            if scores[new]["diverged"]:
                break
        return best, scores


def fmt_steps(steps):
    med = statistics.median(steps)
    if not math.isfinite(med):
        return f"- ({sum(map(math.isfinite, steps))}/{len(steps)} reached)"
    lo, hi = min(steps), max(steps)
    return f"{med:.0f} [{lo:.0f}-{hi:.0f}]" if math.isfinite(hi) else f"{med:.0f} [{lo:.0f}-]"


def cell(s) -> str:
    if s["diverged"]:
        return "div"
    steps = f"{s['median_steps']:.0f}" if math.isfinite(s["median_steps"]) else "-"
    return f"{steps}({s['median_final']:.4g})"


def table(study, problems, methods, seeds) -> str:
    lines = []
    for p in problems:
        lines += [f"\n### {p} (target {TARGETS[p]:g}, {STEPS[p]} steps, batch "
                  f"{get_problem(p).batch_size})\n",
                  "| method | best LR | steps to target, median [min-max] | final loss (median) "
                  "| diverged LRs / grid | grid: median steps (final) |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            try:
                best, scores = study.search(p, m, seeds)
            except KeyError:  # --cached-only and this search is not finished
                continue
            div = sum(s["diverged"] for s in scores.values())
            cells = " ".join(f"{lr:.3g}:{cell(s)}" for lr, s in sorted(scores.items()))
            lines.append(f"| {m} | {best['lr']:.3g} | {fmt_steps(best['steps'])} | "
                         f"{best['median_final']:.4g} | {div}/{len(scores)} | {cells} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


class PairRecorder(Variant):
    """Records, per block and curvature pair: cos(s, y), r = s'y / s's and whether the damping
    bounds were active (r outside [sigma_L, sigma_H])."""

    def _form_pair(self, ok):
        st = self.state["mlbfgs"]
        h = self._history()
        s = st["param_ema"] - st["param_snapshot"]
        y = st["grad_ema"] - st["grad_snapshot"]
        ss, sy, yy = (block_dot(a, b, h.chunk_block, h.num_blocks)
                      for a, b in ((s, s), (s, y), (y, y)))
        r = sy / ss
        self.records.append({"cos": (sy / (ss * yy).sqrt()).tolist(), "r": r.tolist(),
                             "damped": ((r < self.sigma_low) | (r > self.sigma_high)).tolist()})
        return super()._form_pair(ok)


def pair_quality(problem_name, lr, seed=0, **kw):
    """One run of ``Variant(**kw)``; medians over pairs of cos(s, y), r and the damped share."""
    METHODS["_pairs"] = (lambda p, lr: PairRecorder(p, lr=lr, **kw), [])
    PairRecorder.records = []
    run(problem_name, "_pairs", lr, seed)
    rec = [(c, r, d) for e in PairRecorder.records
           for c, r, d in zip(e["cos"], e["r"], e["damped"])]
    return {"pairs": len(rec), "median_cos": statistics.median(c for c, _, _ in rec),
            "median_r": statistics.median(r for _, r, _ in rec),
            "damped": sum(d for _, _, d in rec) / len(rec)}


PAIR_RUNS = [("digits", 0.0316, {"blocks": "group"}), ("digits", 0.0316, {"blocks": "tensor"}),
             ("digits", 0.0316, {"blocks": "group", "beta": 0.9, "update_period": 20}),
             ("quadratic", 0.00316, {}), ("quadratic", 0.00316, {"beta": 0.9, "update_period": 20}),
             ("digits-clf", 0.316, {"blocks": "group"})]


def pairs_table() -> str:
    lines = ["| problem | lr | options | pairs | median cos(s,y) | median s'y/s's | damped |",
             "|---|---|---|---|---|---|---|"]
    for p, lr, kw in PAIR_RUNS:
        q = pair_quality(p, lr, **kw)
        lines.append(f"| {p} | {lr:g} | {kw or 'defaults'} | "
                     f"{q['pairs']} | {q['median_cos']:.3f} | {q['median_r']:.3g} | "
                     f"{q['damped']:.0%} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def pilot(study, problems):
    """SGD-momentum on seed 99 over its grid: the loss at 2/3 of the budget at the best LR."""
    for p in problems:
        out = {}
        for lr in SGD_GRID + [0.316]:
            r = study.get(p, "sgd", lr, 99)
            out[lr] = r["curve"]
        best = min(out, key=lambda lr: out[lr][-1] if math.isfinite(out[lr][-1]) else math.inf)
        k = (2 * STEPS[p] // 3) // EVAL_EVERY
        print(p, "best lr", best, "final", out[best][-1], "at 2/3:", out[best][k])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="digits,digits-clf,quadratic")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pilot", action="store_true")
    ap.add_argument("--pairs", action="store_true", help="pair-quality table (seed 0)")
    ap.add_argument("--cache", default=str(CACHE), help="JSON file of finished runs")
    ap.add_argument("--cached-only", action="store_true",
                    help="table of the finished searches only; start no run")
    a = ap.parse_args()
    torch.set_num_threads(1)
    study = Study(Path(a.cache), a.cached_only)
    problems = a.problems.split(",")
    if a.pilot:
        return pilot(study, problems)
    if a.pairs:
        return print(pairs_table())
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    body = table(study, problems, a.methods.split(","), seeds)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, 1 thread; seeds {seeds}; eval every {EVAL_EVERY} steps")
    print(body)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s, cached runs excluded)")


if __name__ == "__main__":
    main()
