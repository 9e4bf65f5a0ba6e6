"""secant's optimizers against AdamW on three tiny Hugging Face transformers, random init from
configs (nothing downloaded), float32, one CPU thread.

Models: a Llama (byte-level LM, width 64, 2 layers, MLP 176), a GPT-2 (byte-level LM, width
64, 2 layers; its LM head is tied to the embedding, so the layer optimizers move it to first
order), a ViT (patch 8, width 128, 2 layers, MLP 512) classifying scikit-learn's 8×8 digits
(whole set, scaled to [0, 1], bilinearly upsampled to 32×32). LM data: windows of 64 bytes of
the source of four stdlib modules (argparse, inspect, dataclasses, textwrap), batch 16; ViT:
batches of 64 images drawn without replacement. The seed sets the model's initialisation and
the batch sequence (the same batches for every optimizer at a given seed).

Optimizers, library defaults except the learning rate (KFAC's ``damping=3e-2``, the README's
starting value; KBFGS/KBFGSL ``damping=0.3``, their default), each on a 3-point lr grid
(``GRIDS``), 300 steps, seeds 0 and 1. Per run: the training loss of every step (what
``opt.step(closure)`` returns: for Neumann the loss at its displaced weights), the final loss
(mean of the last 20 steps), "diverged" (a non-finite loss, or a final loss above the first
step's), "collapse" (a step after 100 with loss above 2.0 once the loss has been below 1.0,
with the optimizer's ``diagnostics()`` at that step) and ``diagnostics()`` at the end. Each
optimizer's lr is the grid point with the lowest mean final loss over the seeds.

Step time, in a second phase: per model every contender at its chosen lr, 5 warm-up steps
each, then ``--rounds`` rounds of one step of each contender (order rotated every round);
process CPU time per step; ratio = median / AdamW's median. Coverage: ``kronecker_fraction``
of ``opt.coverage()`` for KFAC, KBFGS, KBFGSL.

    python benchmarks/transformers_tiny.py --out /tmp/transformers_tiny_out.md
    python benchmarks/transformers_tiny.py --quick     # smoke test: 20 steps, seed 0, centre lr

Writes every run (loss curves, diagnostics, warnings) and the timings to
``benchmarks/results/transformers_tiny.json`` (``--json``; not written by ``--quick`` unless
given).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import platform
import statistics
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from report_out import emit
from sklearn.datasets import load_digits
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import secant

GRIDS = {
    "AdamW": (1e-3, 3e-3, 1e-2),
    "KFAC": (3e-3, 1e-2, 3e-2),
    "KBFGS": (0.03, 0.1, 0.3),
    "KBFGSL": (0.03, 0.1, 0.3),
    "MomentumLBFGS": (0.01, 0.03, 0.1),
    "Neumann": (3e-3, 1e-2, 3e-2),
}
LAYER_OPTIMIZERS = ("KFAC", "KBFGS", "KBFGSL")
BLOCK, LM_BATCH, IMG_BATCH, LAST, WARMUP = 64, 16, 64, 20, 5
DEFAULT_JSON = Path(__file__).parent / "results" / "transformers_tiny.json"

TEXT = torch.tensor(list("".join(inspect.getsource(m) for m in
                                 (argparse, inspect, dataclasses, textwrap)).encode()))
_digits = load_digits()
IMAGES = F.interpolate(torch.tensor(_digits.images, dtype=torch.float32)[:, None] / 16.0,
                       size=32, mode="bilinear")
LABELS = torch.tensor(_digits.target)

MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0)),
    "vit": lambda: ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, num_channels=1, hidden_size=128, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=512, num_labels=10)),
}


def batches(model_name: str, seed: int, steps: int):
    """The seed's batch sequence, as keyword arguments of the model's forward."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if model_name == "vit":
            idx = torch.randperm(len(IMAGES), generator=gen)[:IMG_BATCH]
            yield {"pixel_values": IMAGES[idx], "labels": LABELS[idx]}
        else:
            start = torch.randint(0, len(TEXT) - BLOCK, (LM_BATCH,), generator=gen)
            ids = torch.stack([TEXT[s: s + BLOCK] for s in start.tolist()])
            yield {"input_ids": ids, "labels": ids}


def make_optimizer(name: str, model: torch.nn.Module, lr: float):
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if name == "KFAC":
        return secant.KFAC(model, lr=lr, damping=3e-2)
    if name in LAYER_OPTIMIZERS:
        return getattr(secant, name)(model, lr=lr, damping=0.3)
    return getattr(secant, name)(model.parameters(), lr=lr)


def one_step(opt, model, batch) -> float:
    def closure():
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss
    return float(opt.step(closure).detach())


def diagnostics(opt):
    return opt.diagnostics() if hasattr(opt, "diagnostics") else None


def train(model_name: str, opt_name: str, lr: float, seed: int, steps: int,
          make=make_optimizer) -> dict:
    """One run; ``make(opt_name, model, lr)`` builds the optimizer."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = make(opt_name, model, lr)
        losses, collapse = [], None
        for t, batch in enumerate(batches(model_name, seed, steps), 1):
            losses.append(one_step(opt, model, batch))
            if not math.isfinite(losses[-1]):
                break
            if collapse is None and t > 100 and losses[-1] > 2.0 and min(losses) < 1.0:
                collapse = {"step": t, "loss": losses[-1], "diagnostics": diagnostics(opt)}
    final = statistics.fmean(losses[-LAST:])
    return {"model": model_name, "optimizer": opt_name, "lr": lr, "seed": seed,
            "losses": [float(f"{v:.6g}") for v in losses], "final": final,
            "diverged": not math.isfinite(final) or final > losses[0], "collapse": collapse,
            "diagnostics": diagnostics(opt),
            "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught})}


def score(runs: list[dict]) -> float:
    """Mean final loss over the seeds; a diverged seed makes it infinite."""
    return math.inf if any(r["diverged"] for r in runs) else statistics.fmean(
        r["final"] for r in runs)


def time_steps(model_name: str, chosen: dict[str, float], rounds: int) -> dict:
    """Interleaved CPU time per step of every contender at its chosen lr, and coverage."""
    contenders = {}
    for name, lr in chosen.items():
        torch.manual_seed(0)
        model = MODELS[model_name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            contenders[name] = (make_optimizer(name, model, lr), model)
    data = list(batches(model_name, 0, WARMUP + rounds))
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, batch in enumerate(data):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.process_time()
            one_step(*contenders[name], batch)
            if r >= WARMUP:
                times[name].append(time.process_time() - t0)
    base = statistics.median(times["AdamW"])
    coverage = {n: contenders[n][0].coverage() for n in names if n in LAYER_OPTIMIZERS}
    return {"seconds": times,
            "ratio": {n: statistics.median(times[n]) / base for n in names},
            "coverage": coverage}


def fmt(x: float, sign: str = "") -> str:
    return "div" if not math.isfinite(x) else f"{x:{sign}.3f}"


def notes(runs: list[dict]) -> str:
    out = [f"diverged lr {r['lr']:g} s{r['seed']}" for r in runs if r["diverged"]]
    out += [f"collapse lr {r['lr']:g} s{r['seed']} at step {r['collapse']['step']}"
            + (" (stayed)" if r["final"] > 2.0 else "") for r in runs if r["collapse"]]
    return "; ".join(out) or "-"


def report(model_name: str, runs: list[dict], chosen: dict[str, float], timing: dict,
           seeds: list[int]) -> str:
    by = {(r["optimizer"], r["lr"]): [x for x in runs if x["optimizer"] == r["optimizer"]
                                      and x["lr"] == r["lr"]] for r in runs}
    ref = score(by["AdamW", chosen["AdamW"]])
    lines = [f"### {model_name}", "",
             "| optimizer | lr (grid) | final loss " + " / ".join(f"seed {s}" for s in seeds)
             + " | vs AdamW (mean) | step time / AdamW | Kronecker fraction | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, lr in chosen.items():
        grid = GRIDS[name]
        edge = " **edge**" if len(grid) > 1 and lr in (grid[0], grid[-1]) else ""
        sel = by[name, lr]
        cov = timing["coverage"].get(name)
        lines.append(
            f"| {name} | {lr:g} ({', '.join(f'{g:g}' for g in grid)}){edge} | "
            + " / ".join(fmt(r["final"]) for r in sel)
            + f" | {fmt(score(sel) - ref, '+')} | {timing['ratio'][name]:.2f}x | "
            + (f"{cov['kronecker_fraction']:.0%}" if cov else "-") + " | "
            + notes([r for r in runs if r["optimizer"] == name]) + " |")
    lines += ["", "Full grid (final loss per seed; `div` = diverged):", "",
              "| optimizer | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---|---|" + "---|" * (len(seeds) + 1)]
    for (name, lr), sel in by.items():
        lines.append(f"| {name} | {lr:g} | "
                     + " | ".join(fmt(math.inf if r["diverged"] else r["final"]) for r in sel)
                     + f" | {fmt(score(sel))} |")
    first = {n: ", ".join(c["first_order"]) or "none" for n, c in timing["coverage"].items()}
    lines += ["", "First-order parameters: " + "; ".join(
        f"{', '.join(n for n in first if first[n] == v)}: {v}" for v in dict.fromkeys(
            first.values()))]
    for name in ("KBFGS", "KBFGSL"):
        for r in by[name, chosen[name]]:
            d = r["diagnostics"]
            lines.append(
                f"- {name} lr {r['lr']:g} seed {r['seed']} at the end, summed over "
                f"{len(d['layers'])} layers: G pairs accepted / "
                f"rejected {d['g_pairs_accepted']} / {d['g_pairs_rejected']}, H_a updates "
                f"{d['a_updates_accepted']} / {d['a_updates_rejected']}, double damping "
                f"step 1 / 2 {d['dd_step1_active']} / {d['dd_step2_active']}, stats rejected "
                f"{d['stats_rejected']}"
                + (f", history {d['history_length']}" if "history_length" in d else ""))
    warned = {w: sorted({r["optimizer"] for r in runs if w in r["warnings"]})
              for r in runs for w in r["warnings"]}
    lines += [f"- warning ({', '.join(n)}): {w}" for w, n in warned.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps, seed 0, centre lr")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    steps, seeds, rounds = (20, [0], 3) if args.quick else (300, [0, 1], args.rounds)
    grids = {n: g[1:2] for n, g in GRIDS.items()} if args.quick else GRIDS
    started = time.time()
    runs, timings, sections = [], {}, []
    for model_name in args.models:
        model_runs = []
        for name, grid in grids.items():
            for lr in grid:
                for seed in seeds:
                    t0 = time.time()
                    model_runs.append(train(model_name, name, lr, seed, steps))
                    r = model_runs[-1]
                    print(f"{model_name} {name} lr {lr:g} seed {seed}: final {r['final']:.4f}"
                          f"{' diverged' if r['diverged'] else ''}"
                          f"{' COLLAPSE' if r['collapse'] else ''} ({time.time() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
        chosen = {n: min(g, key=lambda lr, n=n: score(
            [r for r in model_runs if r["optimizer"] == n and r["lr"] == lr]))
            for n, g in grids.items()}
        timings[model_name] = time_steps(model_name, chosen, rounds)
        sections.append(report(model_name, model_runs, chosen, timings[model_name], seeds))
        runs += model_runs
    elapsed = time.time() - started
    head = (f"machine: {platform.machine()}, 1 torch thread; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}\n"
            f"{steps} steps, seeds {seeds}; step time: {WARMUP} warm-up + {rounds} interleaved "
            f"rounds; total {elapsed / 60:.1f} min wall")
    emit(head + "\n\n" + "\n\n".join(sections), args.out)
    path = args.json or (None if args.quick else DEFAULT_JSON)
    if path:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version(), "steps": steps, "seeds": seeds,
                       "grids": grids, "wall_seconds": elapsed, "runs": runs,
                       "timing": timings}, f, default=float)


if __name__ == "__main__":
    main()
