"""Train a Hugging Face causal language model with a layer optimizer (K-FAC or K-BFGS).

Byte-level language modelling on text that ships with Python (the source of its ``argparse``
module), on a small GPT-2 built from a config (random weights: nothing is downloaded). GPT-2's
attention and MLP layers are transformers' ``Conv1D``; they get Kronecker curvature, and the LM
head (tied to the token embedding) gets the first-order update: ``opt.coverage()`` shows the
split.

    python examples/causal_lm_kfac.py --optimizer kbfgs --steps 200
"""

import argparse
import inspect

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import secant


def batches(block: int, batch: int, gen: torch.Generator):
    data = torch.tensor(list(inspect.getsource(argparse).encode()), dtype=torch.long)
    while True:
        start = torch.randint(0, len(data) - block, (batch,), generator=gen)
        yield torch.stack([data[s: s + block] for s in start.tolist()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=["kfac", "kbfgs"], default="kfac")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=args.width,
                                       n_layer=args.layers, n_head=4, bos_token_id=0,
                                       eos_token_id=0))
    if args.optimizer == "kfac":
        opt = secant.KFAC(model, lr=0.1, damping=0.1, weight_decay=0.0)
    else:
        opt = secant.KBFGS(model, lr=0.1, damping=0.3, weight_decay=0.0)
    cov = opt.coverage()
    print(f"{cov['kronecker_fraction']:.0%} of the parameters get curvature; first-order: "
          f"{', '.join(cov['first_order'])}")
    data = batches(block=32, batch=16, gen=torch.Generator().manual_seed(0))
    for step in range(1, args.steps + 1):
        ids = next(data)

        def closure(ids=ids):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        loss = float(opt.step(closure).detach())
        if step == 1 or step % max(1, args.steps // 10) == 0:
            print(f"step {step}: loss {loss:.3f} (ln 256 = 5.545)")


if __name__ == "__main__":
    main()
