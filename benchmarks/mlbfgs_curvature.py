"""Why mL-BFGS's curvature barely turns the step (issue 22): controlled measurements.

``MomentumLBFGS`` applies ``d = H g`` with the L-BFGS matrix ``H`` of m stored pairs. ``H`` equals
``γ I`` outside ``span(S, Y)`` (at most 2m directions of an n-dim block) and maps that span
into itself, so with ``P`` the projector onto the span and ``ρ = ‖P g‖ / ‖g‖``::

    d = γ (g − P g) + H P g,    cos(d, g) → 1 as ρ → 0, whatever the pairs.

A probe (a ``MomentumLBFGS`` subclass that changes nothing in the run) reads the stored pairs
from ``opt.state`` in the optimizer's own chunk layout every ``PROBE_EVERY`` steps of the second
half of a run and computes, per block, in float64: a dense two-loop ``H g`` (its cosine agrees
with ``diagnostics()`` to 5e-5), the relative correction ``c = ‖(H − γI) g‖ / ‖γ g‖`` (the
cosine is about ``1/sqrt(1 + c²)``), the share ``ρ`` of ``g`` in span(S, Y), in span(S) and in
the "active" eigen-directions of ``H`` on the span (eigenvalue outside [2/3, 3/2]·γ), the gain
``a = ‖H P g‖ / (γ ‖P g‖)`` and the largest eigenvalue of ``H`` on the span over ``γ``. At every
pair it records the raw ``r = sᵀy/sᵀs``, ``cos(s, y)``, ``cos(s, s_prev)``, ``cos(s, θ)``,
whether ``r`` was outside [σ_L, σ_H], and ``cos(s, ŷ)`` of the stored (damped) pair. On a
quadratic with a known Hessian ``A`` (n = 500, eigenvalues log-spaced over [1e-3, 1],
additive Gaussian gradient noise σ) it also compares ``d`` with the Newton directions ``A⁻¹ g``
and ``A⁻¹ ∇f``. Reported: medians over the probes (and over the pairs of the second half),
then medians over seeds 0–2.

Problems: the quadratic; the harness's ``digits`` autoencoder (64-32-16-8-16-32-64, batch 100)
and ``mnist1d`` MLP (40-256-128-10, batch 100); a small ResNet with BatchNorm on the digits
upsampled to 32×32 (3×3 stem, basic blocks of 16/32/64 channels with 1×1-conv shortcuts,
linear head, 78,042 parameters, batch 64, weight decay 5e-4, 400 steps, loss on a fixed
256-image training subset in eval mode).

Part ``probes``: the hypotheses (subspace, averaging, scaling/damping, known answer). Part
``gain``: steps to a fixed loss target and final loss for SGD-momentum, SGD on the globally
normalised gradient and mL-BFGS settings, each at its best LR of a small grid, seeds 0–2.
Results and reading: ``benchmarks/mlbfgs_curvature.md``.

Run (one thread; about 85 minutes of runs on a loaded shared 2-core machine; resumable: every
finished run is cached in ``benchmarks/results/mlbfgs_curvature.json``, and the tables are
printed from it, so with the committed file the command below prints them at once):

    python benchmarks/mlbfgs_curvature.py                 # probes + gain, then the tables
    python benchmarks/mlbfgs_curvature.py --quick         # < 1 min smoke test (no cache)
    python benchmarks/mlbfgs_curvature.py --pilot         # SGD on seed 99: sets TARGETS
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
import torch.nn.functional as F
from torch import nn

from secant import MomentumLBFGS
from secant.bench.data import load_digits_split
from secant.bench.problems import get_problem, seeded_model
from secant.linalg import block_dot, newest_pair

CACHE = Path(__file__).parent / "results" / "mlbfgs_curvature.json"
SEEDS = (0, 1, 2)
PROBE_EVERY = 10
STEPS = {"quad": 1000, "digits": 1500, "mnist1d": 1500, "resnet": 400}
EVAL_EVERY = {"quad": 10, "digits": 10, "mnist1d": 10, "resnet": 25}
# Loss at 2/3 of the budget of SGD-momentum at its best LR of GRIDS on seed 99 (--pilot),
# rounded, then frozen (quad: 0.0194 at lr 0.1; resnet: 0.097 at lr 0.1, both best at the grid's
# edge); digits and mnist1d as in benchmarks/mlbfgs_defaults.md (same rule, budget and batch).
TARGETS = {"quad": 0.02, "digits": 18.6, "mnist1d": 0.08, "resnet": 0.1}
QUAD_NOISE = 0.01  # default gradient-noise σ of the quadratic


# ------------------------------------------------------------------------------ problems
class Quadratic(nn.Module):
    """``f(θ) = ½ θᵀAθ`` (minimum 0 at θ = 0), n = 500, eigenvalues log-spaced over [1e-3, 1],
    random rotation (fixed); the stochastic gradient is ``Aθ + σ ξ``, ξ ~ N(0, I)."""

    def __init__(self, seed: int, noise: float, n: int = 500):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        eig = torch.logspace(-3, 0, n, dtype=torch.float64)
        self.a, self.a_inv = q @ torch.diag(eig) @ q.T, q @ torch.diag(1 / eig) @ q.T
        gen.manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
        self.noise = noise

    def full(self):
        with torch.no_grad():
            return 0.5 * self.theta @ self.a @ self.theta

    def sample(self, gen):
        xi = torch.randn(self.theta.shape, generator=gen, dtype=torch.float64)
        return 0.5 * self.theta @ self.a @ self.theta + self.noise * xi @ self.theta


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.stages = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class Task:
    """One problem instance: model, minibatch loss, full loss, blocks per layer."""

    def __init__(self, name: str, seed: int, batch: int | None, noise: float):
        self.name, self.newton = name, None
        if name == "quad":
            self.model = Quadratic(seed, noise)
            self.sample, self.full = self.model.sample, self.model.full
            self.newton, self.layers = (self.model.a, self.model.a_inv), [[self.model.theta]]
            return
        if name == "resnet":
            x, y, _, _ = load_digits_split()
            x = F.interpolate(x.view(-1, 1, 8, 8), size=32, mode="bilinear")
            x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions on CPU
            torch.manual_seed(seed)
            self.model = m = ResNet().to(memory_format=torch.channels_last)
            bs, ev = batch or 64, slice(0, 256)  # full loss: a fixed 256-image training subset
            self.layers = [list(b.parameters()) for b in (m.stem, *m.stages, m.head)]
        else:
            p = get_problem(name)
            data = p.load(None, False)
            x, y = data.x_train, data.y_train
            self.model, bs, ev = seeded_model(p, seed), batch or p.batch_size, slice(None)
            self.layers = [list(mod.parameters()) for mod in self.model.modules()
                           if isinstance(mod, nn.Linear)]

        def loss(idx):
            out = self.model(x[idx])
            if y is None:  # autoencoder: pixel-summed sigmoid BCE, as the harness
                return F.binary_cross_entropy_with_logits(out, x[idx], reduction="none").sum(1)\
                    .mean()
            return F.cross_entropy(out, y[idx])

        def sample(gen):
            self.model.train()
            idx = torch.randint(0, len(x), (bs,), generator=gen)
            return loss(idx)

        def full():
            self.model.eval()
            with torch.no_grad():
                return loss(ev)

        self.sample, self.full = sample, full


# ------------------------------------------------------------------------------ probe
def two_loop(s, y, gamma, v):
    """Dense float64 L-BFGS ``H v`` from ``H₀ = γI`` and pairs ``s, y [k, n]`` (oldest first);
    ``v [n]`` or ``[n, r]``."""
    q = v.reshape(v.shape[0], -1).clone()
    rho = 1.0 / (s * y).sum(1)
    alphas = []
    for i in reversed(range(len(s))):
        a = rho[i] * (s[i] @ q)
        q -= torch.outer(y[i], a)
        alphas.append(a)
    r = gamma * q
    for i in range(len(s)):
        b = rho[i] * (y[i] @ r)
        r += torch.outer(s[i], alphas[len(s) - 1 - i] - b)
    return r.reshape(v.shape)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


class Probe(MomentumLBFGS):
    """MomentumLBFGS that records what its pairs do, without changing the run."""

    def __init__(self, params, newton=None, probe_from=0, probe_every=PROBE_EVERY, **kw):
        super().__init__(params, **kw)
        self.newton, self.probe_from, self.probe_every = newton, probe_from, probe_every
        self.pair_log, self.probe_log, self._prev_s = [], [], None

    def _form_pair(self, ok):
        st = self.state["mlbfgs"]
        cb, nb = self._own_chunk_block, len(self._layout.shards[0])
        s = st["param_ema"] - st["param_snapshot"]
        y = st["grad_ema"] - st["grad_snapshot"]
        ss, sy, yy = (block_dot(a, b, cb, nb).double() for a, b in ((s, s), (s, y), (y, y)))
        r = sy / ss
        rec = {"r": r.tolist(), "cos_sy": (sy / (ss * yy).sqrt()).tolist(),
               "damped": ((r < self.sigma_low) | (r > self.sigma_high)).tolist()}
        if self._prev_s is not None:
            p = self._prev_s
            rec["cos_prev"] = (block_dot(s, p, cb, nb).double()
                               / (ss * block_dot(p, p, cb, nb).double()).sqrt()).tolist()
        self._prev_s = s.clone()
        theta = self._theta
        rec["cos_s_theta"] = (block_dot(s, theta, cb, nb).double() / (
            ss * block_dot(theta, theta, cb, nb).double()).sqrt()).tolist()
        super()._form_pair(ok)
        s, y = newest_pair(self._history())  # the stored (damped) pair
        ss, sy, yy = (block_dot(a, b, cb, nb).double() for a, b in ((s, s), (s, y), (y, y)))
        rec["cos_s_yhat"] = (sy / (ss * yy).sqrt()).tolist()
        self.pair_log.append(rec)

    def _precondition(self, d):
        t = self.state["mlbfgs"]["step"]
        probe = t % self.probe_every == 0 and t > self.probe_from
        g = d[self._own].clone() if probe else None
        super()._precondition(d)
        if g is not None:
            self.probe_log.append(self._probe(g, t))

    @torch.no_grad()
    def _probe(self, g, t):
        h = self._history()
        m, cb = h.size, self._own_chunk_block
        rec = {"t": t, "blocks": []}
        gs, ds, pgs, ng = [], [], [], []
        diag = self.diagnostics()
        for b in range(h.num_blocks):
            rows = (cb == b).nonzero().squeeze(1)
            gb = g[rows].double().reshape(-1)
            k, head = int(h.count[b]), int(h.head[b])
            slots = [(head - k + i) % m for i in range(k)]  # oldest first
            z = h.z[rows].double()
            s = z[:, slots].transpose(0, 1).reshape(k, -1)
            y = z[:, [j + m for j in slots]].transpose(0, 1).reshape(k, -1)
            gamma = float(s[-1] @ y[-1] / (y[-1] @ y[-1] + self.curvature_eps))
            db = two_loop(s, y, gamma, gb)
            u, sv, _ = torch.linalg.svd(torch.cat([s, y]).T, full_matrices=False)
            q = u[:, sv > sv[0] * 1e-6]  # float32 pairs: smaller is rounding
            us, sv, _ = torch.linalg.svd(s.T, full_matrices=False)
            us = us[:, sv > sv[0] * 1e-6]
            pg = q @ (q.T @ gb)
            hq = q.T @ two_loop(s, y, gamma, q)
            eig, vec = torch.linalg.eigh(0.5 * (hq + hq.T) / gamma)
            act = q @ vec[:, (eig < 2 / 3) | (eig > 1.5)]  # where H differs from γI by > 1.5×
            hpg = two_loop(s, y, gamma, pg)
            gs.append(gb), ds.append(db), pgs.append(pg)
            rec["blocks"].append({
                "n": gb.numel(), "cos": cos(db, gb),
                "cos_lib": diag["direction_cosine_per_block"][b],
                "rho": float(pg.norm() / gb.norm()),
                "rho_s": float((us.T @ gb).norm() / gb.norm()),
                "rho_act": float((act.T @ gb).norm() / gb.norm()), "dim_act": act.shape[1],
                "corr": float((db - gamma * gb).norm() / (gamma * gb.norm())),
                "gain": float(hpg.norm() / (gamma * pg.norm())),
                "eig_max": float(eig.max()), "eig_min": float(eig.min()), "gamma": gamma,
                "span": diag["pair_span_per_block"][b], "k": k,
                "rq_min": diag["curvature_min_per_block"][b],
                "rq_max": diag["curvature_max_per_block"][b]})
            if self.newton is not None:
                ng.append((gb, db, q))
        g_all, d_all = torch.cat(gs), torch.cat(ds)
        rec["cos_global"] = cos(d_all, g_all)
        rec["rho_global"] = float(torch.cat(pgs).norm() / g_all.norm())
        if ng:  # quadratic: one block; the first n entries are θ (the rest is padding)
            gb, db, q = ng[0]
            a, a_inv = self.newton
            n = a.shape[0]
            newton = a_inv @ gb[:n]
            rec["cos_newton"] = cos(db[:n], newton)
            rec["cos_g_newton"] = cos(gb[:n], newton)
            rec["newton_share"] = float((q[:n].T @ newton).norm() / newton.norm())
            theta = self.param_groups[0]["params"][0].detach()  # A⁻¹ ∇f = θ − θ* = θ
            rec["cos_min"], rec["cos_g_min"] = cos(db[:n], theta), cos(gb[:n], theta)
            rec["noise_ratio"] = float((gb[:n] - a @ theta).norm() / (a @ theta).norm())
        return rec


def summarise(opt):
    """Medians over the probes (and pairs) of the second half of the run."""
    late = opt.probe_log
    if not late:
        return {}
    med = statistics.median
    out = {key: med(p[key] for p in late) for key in late[0] if key not in ("t", "blocks")}
    for key in late[0]["blocks"][0]:
        vals = [b[key] for p in late for b in p["blocks"] if math.isfinite(b[key])]
        out["block_" + key] = med(vals) if vals else math.nan
    big = max(range(len(late[0]["blocks"])), key=lambda i: late[0]["blocks"][i]["n"])
    for key in ("cos", "rho", "gain"):
        out["largest_" + key] = med(p["blocks"][big][key] for p in late)
    out["cos_check"] = max(abs(b["cos"] - b["cos_lib"]) for p in late for b in p["blocks"])
    pairs = opt.pair_log[len(opt.pair_log) // 2:]
    for key in ("r", "cos_sy", "cos_prev", "damped", "cos_s_theta", "cos_s_yhat"):
        vals = [v for p in pairs if key in p for v in p[key] if math.isfinite(v)]
        if vals:
            out["pair_" + key] = med(vals) if key != "damped" else sum(vals) / len(vals)
    return out


# ------------------------------------------------------------------------------ methods
class NormalizedSGD(torch.optim.SGD):
    """SGD (heavy-ball momentum) on the globally normalised weight-decayed gradient."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, lr=lr, momentum=momentum)
        self.wd = weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.wd:
            torch._foreach_add_([p.grad for p in ps], ps, alpha=self.wd)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in ps])))
        torch._foreach_div_([p.grad for p in ps], norm.clamp(min=1e-30))
        return super().step(closure)


RELEASED = dict(step_rule="unit", ema_normalized=False, grad_ema_reset=True, pair_momentum=0.9,
                grad_ema_weight_decay=True, curvature_eps=1e-12)


def make_opt(task, method, lr, wd, kw, steps, probe_every):
    params = list(task.model.parameters())
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if method == "nsgd":
        return NormalizedSGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    kw = dict(kw)
    if kw.pop("released", False):
        kw.update(RELEASED)
    if kw.get("blocks") == "layer":
        kw["blocks"] = task.layers
    return Probe(params, newton=task.newton, probe_from=steps // 2, probe_every=probe_every,
                 lr=lr, weight_decay=wd, **kw)


def run(problem, method, lr, seed, kw, steps=None, batch=None, noise=QUAD_NOISE,
        probe_every=PROBE_EVERY):
    torch.manual_seed(seed)
    task = Task(problem, seed, batch, noise)
    steps = steps or STEPS[problem]
    wd = 5e-4 if problem == "resnet" else 0.0
    opt = make_opt(task, method, lr, wd, kw, steps, probe_every)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve = [float(f"{task.full():.6g}")]  # 6 digits keep the cache small
    for t in range(1, steps + 1):
        opt.zero_grad()
        task.sample(gen).backward()
        opt.step()
        if t % EVAL_EVERY[problem] == 0:
            curve.append(float(f"{task.full():.6g}"))
            if not math.isfinite(curve[-1]) or curve[-1] > 10 * curve[0]:
                break
    out = {"curve": curve, "final": curve[-1],
           "diverged": not math.isfinite(curve[-1]) or curve[-1] > curve[0]}
    if isinstance(opt, Probe):
        out["probe"] = summarise(opt)
        out["damping_activations"] = opt.diagnostics()["damping_activations"]
    return out


class Cache:
    def __init__(self, path):
        self.path = path
        self.db = json.loads(path.read_text()) if path and path.exists() else {}

    def get(self, problem, method, lr, seed, kw, **extra):
        key = json.dumps([problem, method, f"{lr:.4g}", seed, kw, extra], sort_keys=True)
        if key not in self.db:
            t0 = time.perf_counter()
            self.db[key] = run(problem, method, lr, seed, kw, **extra)
            self.db[key]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{time.perf_counter() - t0:6.1f}s {key}", file=sys.stderr, flush=True)
            if self.path:
                self.path.parent.mkdir(exist_ok=True)
                self.path.write_text(json.dumps(self.db))
        return self.db[key]


# ------------------------------------------------------------------------------ experiments
DEFAULT_LR = {"quad": 0.1, "digits": 0.0316, "mnist1d": 0.1, "resnet": 0.03}
# (label, MomentumLBFGS options, extra run arguments)
NET_PROBES = [
    ("default (m 10, β .999, T 50, group)", {}, {}),
    ("m 50", {"history_size": 50}, {}),
    ("blocks per layer", {"blocks": "layer"}, {}),
    ("blocks per tensor", {"blocks": "tensor"}, {}),
    ("β 0.99, T 50", {"beta": 0.99}, {}),
    ("β 0.9, T 50", {"beta": 0.9}, {}),
    ("β 0.999, T 10", {"update_period": 10}, {}),
    ("β 0.99, T 10", {"beta": 0.99, "update_period": 10}, {}),
    ("β 0.9, T 10", {"beta": 0.9, "update_period": 10}, {}),
    ("β 0.9, T 10, m 50 (probe every 50 steps)",
     {"beta": 0.9, "update_period": 10, "history_size": 50}, {"probe_every": 50}),
    ("σ bounds off (1e-6, 1e6)", {"sigma_low": 1e-6, "sigma_high": 1e6}, {}),
    ("σ bounds off and damping 0", {"sigma_low": 1e-6, "sigma_high": 1e6, "damping": 0.0}, {}),
    ("batch ÷4", {}, {"batch": 25}),
    ("batch ×4", {}, {"batch": 400}),
    ("released", {"released": True}, {}),
]
RESNET_PROBES = [p for p in NET_PROBES  # time; the first two are gain runs at lr 0.03
                 if p[0] in ("default (m 10, β .999, T 50, group)", "β 0.9, T 10", "released")]
QUAD_PROBES = [(f"σ {n:g}, m {m}", {"history_size": m}, {"noise": n})
               for n in (0.0, 0.001, 0.01, 0.1) for m in (10, 50)] + [
    ("σ 0.01, β 0.99, T 50", {"beta": 0.99}, {}),
    ("σ 0.01, β 0.9, T 50", {"beta": 0.9}, {}),
    ("σ 0.01, β 0.999, T 10", {"update_period": 10}, {}),
    ("σ 0.01, β 0.9, T 10", {"beta": 0.9, "update_period": 10}, {}),
    ("σ 0, β 0.9, T 10", {"beta": 0.9, "update_period": 10}, {"noise": 0.0}),
    ("σ 0.01, σ bounds off", {"sigma_low": 1e-6, "sigma_high": 1e6}, {}),
    ("σ 0, σ bounds off", {"sigma_low": 1e-6, "sigma_high": 1e6}, {"noise": 0.0}),
    ("σ 0.01, σ bounds off and damping 0",
     {"sigma_low": 1e-6, "sigma_high": 1e6, "damping": 0.0}, {}),
    ("σ 0.01, released", {"released": True}, {}),
]
PROBES = {"quad": QUAD_PROBES, "digits": NET_PROBES, "mnist1d": NET_PROBES,
          "resnet": RESNET_PROBES}

# gain: name -> (method, options); LR grids per problem (SGD-scale, normalised)
CONTENDERS = {"SGD-momentum": ("sgd", {}), "normalised SGD": ("nsgd", {}),
              "mL-BFGS default": ("mlb", {}),
              "mL-BFGS β 0.9, T 10": ("mlb", {"beta": 0.9, "update_period": 10}),
              "mL-BFGS blocks per layer": ("mlb", {"blocks": "layer"}),
              "mL-BFGS damping 0, σ bounds off": ("mlb", {"sigma_low": 1e-6, "sigma_high": 1e6,
                                                          "damping": 0.0})}
# time: per-layer blocks lost on digits and equal the default on the one-tensor quadratic
SKIP = {("resnet", "mL-BFGS blocks per layer"), ("mnist1d", "mL-BFGS blocks per layer"),
        ("resnet", "mL-BFGS damping 0, σ bounds off")}
GRIDS = {"quad": ([0.0316, 0.1, 0.316], [0.00316, 0.01, 0.0316, 0.1]),
         "digits": ([0.01, 0.0316, 0.1], [0.0316, 0.1, 0.316]),
         "mnist1d": ([0.0316, 0.1, 0.316], [0.0316, 0.1, 0.316]),
         "resnet": ([0.03, 0.1], [0.01, 0.03, 0.1])}


def steps_to(curve, target, every):
    return next((i * every for i, v in enumerate(curve) if v <= target), math.inf)


def probe_tables(cache, problems, seeds, quick):
    cols = [("cos(d,g) global", "cos_global"), ("cos(d,g) blocks", "block_cos"),
            ("‖(H−γI)g‖/‖γg‖", "block_corr"), ("ρ=‖Pg‖/‖g‖", "rho_global"),
            ("ρ_S", "block_rho_s"), ("ρ_act", "block_rho_act"), ("dim act", "block_dim_act"),
            ("gain a", "block_gain"), ("max eig(H on span)/γ", "block_eig_max"),
            ("pair span", "block_span"),
            ("raw sᵀy/sᵀs", "pair_r"), ("cos(s,y)", "pair_cos_sy"),
            ("cos(s,s_prev)", "pair_cos_prev"), ("cos(s,θ)", "pair_cos_s_theta"),
            ("damped", "pair_damped"), ("cos(s,ŷ)", "pair_cos_s_yhat")]
    out = []
    for p in problems:
        extra_cols = [("‖g−∇f‖/‖∇f‖", "noise_ratio"), ("cos(d,A⁻¹g)", "cos_newton"),
                      ("cos(g,A⁻¹g)", "cos_g_newton"),
                      ("‖P A⁻¹g‖/‖A⁻¹g‖", "newton_share"), ("cos(d,A⁻¹∇f)", "cos_min"),
                      ("cos(g,A⁻¹∇f)", "cos_g_min")] if p == "quad" else []
        cs = cols + extra_cols
        out += [f"\n### {p}: probes (lr {DEFAULT_LR[p]:g}; medians of the 2nd half, then "
                f"over seeds {list(seeds)})\n", "| setting | " + " | ".join(c for c, _ in cs)
                + " |", "|---" * (len(cs) + 1) + "|"]
        for label, kw, extra in (PROBES[p][:1] if quick else PROBES[p]):
            runs = [cache.get(p, "mlb", DEFAULT_LR[p], s, kw, steps=quick or None, **extra)
                    for s in seeds]
            cells = []
            for _, key in cs:
                vals = [r["probe"].get(key, math.nan) for r in runs if r.get("probe")]
                v = statistics.median(vals) if vals else math.nan
                cells.append(f"{v:.3g}" if key != "pair_damped" else f"{v:.0%}")
            check = max((r["probe"].get("cos_check", 0) for r in runs if r.get("probe")),
                        default=math.nan)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
            if check > 1e-3:
                out[-1] += f" (cos vs diagnostics() differs by {check:.2g})"
            print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def gain_tables(cache, problems, seeds, quick):
    out = []
    for p in problems:
        if quick and p == "resnet":
            continue
        target, every = TARGETS[p], EVAL_EVERY[p]
        out += [f"\n### {p}: gain (target {target:g}, {quick or STEPS[p]} steps)\n",
                "| contender | best lr | steps to target, median [min-max] | final loss "
                "(median) | cos(d,g) | grid: lr: median steps (final) |",
                "|---|---|---|---|---|---|"]
        for name, (method, kw) in CONTENDERS.items():
            if (p, name) in SKIP:
                continue
            grid = GRIDS[p][1 if method == "nsgd" else 0]
            scores = {}
            for lr in (grid[1:2] if quick else grid):
                runs = [cache.get(p, method, lr, s, kw, steps=quick or None) for s in seeds]
                st = [steps_to(r["curve"], target, every) for r in runs]
                fin = [r["final"] if math.isfinite(r["final"]) else math.inf for r in runs]
                c = [r["probe"].get("cos_global", math.nan) for r in runs if r.get("probe")]
                scores[lr] = (statistics.median(st), statistics.median(fin), st,
                              statistics.median(c) if c else math.nan,
                              any(r["diverged"] for r in runs))
            best = min(scores, key=lambda lr: scores[lr][:2])
            med, fin, st, c, _ = scores[best]
            steps = "-" if not math.isfinite(med) else f"{med:.0f}"
            rng = "-".join("-" if not math.isfinite(v) else f"{v:.0f}" for v in (min(st), max(st)))
            grid_txt = " ".join(f"{lr:g}:{'div' if v[4] else ''}"
                                f"{'-' if not math.isfinite(v[0]) else f'{v[0]:.0f}'}({v[1]:.4g})"
                                for lr, v in sorted(scores.items()))
            out.append(f"| {name} | {best:g} | {steps} [{rng}] | {fin:.4g} | {c:.3g} | "
                       f"{grid_txt} |")
            print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def pilot(cache, problems):
    for p in problems:
        curves = {lr: cache.get(p, "sgd", lr, 99, {})["curve"] for lr in GRIDS[p][0]}
        best = min(curves, key=lambda lr: curves[lr][-1] if math.isfinite(curves[lr][-1])
                   else math.inf)
        k = (2 * STEPS[p] // 3) // EVAL_EVERY[p]
        print(f"{p}: best lr {best:g}, final {curves[best][-1]:.4g}, at 2/3: {curves[best][k]:.4g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: short runs, no cache")
    ap.add_argument("--problems", default="quad,digits,mnist1d,resnet")
    ap.add_argument("--part", default="probes,gain")
    ap.add_argument("--pilot", action="store_true")
    ap.add_argument("--cache", default=str(CACHE), help="JSON file of finished runs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    problems = a.problems.split(",")
    cache = Cache(None if a.quick else Path(a.cache))
    if a.pilot:
        return pilot(cache, problems)
    quick = 110 if a.quick else 0  # the first pair is formed at step 2T = 100
    seeds = SEEDS[:1] if a.quick else SEEDS
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, 1 thread")
    if "probes" in a.part:
        print(probe_tables(cache, problems, seeds, quick))
    if "gain" in a.part:
        print(gain_tables(cache, problems, seeds, quick))
    print(f"\n(wall {time.perf_counter() - t0:.0f} s, cached runs excluded)")


if __name__ == "__main__":
    main()
