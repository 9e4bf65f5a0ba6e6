"""K-BFGS(L)'s sliding window on the small ViT of ``transformers_tiny.py``: the paper's L-BFGS
``H_g`` in every layer (``KBFGSL``) against ``KBFGSL(dense_hg=True)`` (K-BFGS's dense ``H_g`` in
the layers with ``d_out ≤ 2·history_size``, here all but the two MLP expansions) and K-BFGS.

Model, data, loss, step and the "collapse" / "diverged" rules are ``transformers_tiny.py``'s
(ViT patch 8, width 128, 2 layers, MLP 512 on digits upsampled to 32×32, batch 64; a collapse
is a step after 100 with loss above 2.0 once the loss has been below 1.0). ``damping=0.3``,
``history_size=100`` (the defaults), 300 steps, so the ring wraps at step ~100; lr grid
``--lrs``, seeds ``--seeds``. One CPU thread per run, ``--jobs`` runs at a time.

    python benchmarks/kbfgsl_window.py --jobs 2 --json benchmarks/results/kbfgsl_window.json

Writes every run's losses, final loss and collapse to ``--json`` and prints the Markdown table
of ``benchmarks/kbfgsl_window.md``. With ``--curves DIR`` it runs instead the ``paper-ae``
suite's CURVES problem through ``secant bench`` (3 seeds, 100 epochs, the tuned lr and damping
of ``kbfgsl``) for ``kbfgsl`` and ``kbfgsl-dense`` (``dense_hg=True``: the layers of width
≤ 200 keep a dense ``H_g``, the 400- and 784-wide ones the ring) and writes its report to DIR.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from secant.bench import api, registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transformers_tiny as tiny  # noqa: E402

import secant  # noqa: E402

CONTENDERS = {
    "KBFGSL": lambda model, lr: secant.KBFGSL(model, lr=lr, damping=0.3),
    "KBFGSL dense_hg": lambda model, lr: secant.KBFGSL(model, lr=lr, damping=0.3,
                                                       dense_hg=True),
    "KBFGS": lambda model, lr: secant.KBFGS(model, lr=lr, damping=0.3),
}


def make(name, model, lr):
    return CONTENDERS[name](model, lr)


def one(job: tuple[str, float, int, int]) -> dict:
    torch.set_num_threads(1)
    name, lr, seed, steps = job
    run = tiny.train("vit", name, lr, seed, steps, make=make)
    run.pop("diagnostics")
    if run["collapse"]:
        run["collapse"] = run["collapse"]["step"]
    return run


def table(runs: list[dict]) -> str:
    lines = ["| optimizer | lr | final loss per seed | highest loss after step 100, per seed "
             "| collapsed (step) | diverged |", "|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        for lr in sorted({r["lr"] for r in runs}):
            rs = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
            if not rs:
                continue
            finals = " / ".join(f"{r['final']:.3f}" for r in rs)
            peaks = " / ".join(f"{max(r['losses'][100:]):.2f}" for r in rs)
            coll = ", ".join(f"s{r['seed']} ({r['collapse']})" for r in rs if r["collapse"])
            div = ", ".join(f"s{r['seed']}" for r in rs if r["diverged"])
            lines.append(f"| {name} | {lr:g} | {finals} (mean "
                         f"{statistics.fmean(r['final'] for r in rs):.3f}) | {peaks} | "
                         f"{coll or '-'} | "
                         f"{div or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--curves", help="run the CURVES comparison instead; its report folder")
    ap.add_argument("--table", type=Path, help="print the table of a --json file and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["runs"]))
        return
    if args.curves:
        dense = registry.register_variant("kbfgsl", "kbfgsl-dense", "curves", dense_hg=True)
        api.run("curves", optimizers=["kbfgsl", dense], seeds=args.seeds,
                jobs=args.jobs, out=args.curves, progress=False,
                note="kbfgsl: the paper's K-BFGS(L); kbfgsl-dense: the same optimizer and "
                "settings with dense_hg=True")
        return
    jobs = [(name, lr, seed, args.steps) for seed in range(args.seeds) for lr in args.lrs
            for name in CONTENDERS]
    start = time.time()
    with mp.get_context("fork").Pool(args.jobs) as pool:
        runs = pool.map(one, jobs, chunksize=1)
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "command": "python benchmarks/kbfgsl_window.py " + " ".join(sys.argv[1:]),
           "wall_seconds": time.time() - start, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(out))
    print(table(runs))


if __name__ == "__main__":
    main()
