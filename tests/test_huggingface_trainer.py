"""Hugging Face ``Trainer`` with every optimizer (``secant.integrations.huggingface``): on a tiny
random-init Llama and GPT-2, ``SecantTrainer.train()`` gives the same parameters as the plain
PyTorch loop over the same batches, with and without gradient accumulation, and K-BFGS under
``fp16`` is refused with a message that says what to do."""

import warnings

import pytest
import torch
from every_optimizer import EVERY_OPTIMIZER

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from secant.integrations.huggingface import SecantTrainer  # noqa: E402

N, T, STEPS = 8, 12, 3
IDS = torch.randint(0, 64, (N, T), generator=torch.Generator().manual_seed(0))
# the first token is never a target: the Trainer's token count (its loss normaliser) then equals
# the model's own (GPT-2 would otherwise be scaled by (T - 1) / T under the Trainer)
LABELS = IDS.masked_fill(torch.arange(T) == 0, -100)
DATA = [{"input_ids": x, "labels": y} for x, y in zip(IDS, LABELS)]


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=2, max_position_embeddings=T)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def build(name, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's tied head goes to first order, with a warning
        return EVERY_OPTIMIZER[name](model)


def train_with_trainer(tmp_path, kind, name, accumulation=1, **args):
    model = tiny(kind)
    opt = build(name, model)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=N // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=STEPS, lr_scheduler_type="constant",
        max_grad_norm=0.0, report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, **args)
    trainer = SecantTrainer(model=model, args=targs, train_dataset=DATA, optimizers=(opt, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, trainer


def train_plain(kind, name):
    """The full batch each step: the Trainer's shuffling only reorders rows inside it."""
    model = tiny(kind)
    opt = build(name, model)
    losses = []
    for _ in range(STEPS):
        def closure():
            opt.zero_grad()
            loss = model(input_ids=IDS, labels=LABELS).loss
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return model, losses


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_trainer_equals_the_plain_loop(tmp_path, kind, name):
    model, trainer = train_with_trainer(tmp_path, kind, name)
    ref, losses = train_plain(kind, name)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        assert max((p - q).abs().max() for p, q in zip(ref.parameters(),
                                                       tiny(kind).parameters())) > 1e-3
    assert "step" not in vars(trainer.optimizer.optimizer)  # the skipped loop step is undone
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(losses, rel=1e-4)


@pytest.mark.parametrize("name", ["KBFGS", "KFAC"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, name):
    """Two micro-batches of 4 per step: K-BFGS's closure runs both (its statistics and gradient
    are those of the 8 rows), K-FAC accumulates over the two backward calls."""
    model, _ = train_with_trainer(tmp_path, "llama", name, accumulation=2)
    ref, _ = train_plain("llama", name)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_kbfgs_under_fp16_is_refused(tmp_path):
    model = tiny("llama")
    opt = build("KBFGS", model)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                           report_to="none", use_cpu=True)
    trainer = SecantTrainer(model=model, args=targs, optimizers=(opt, None),
                            train_dataset=DATA)
    trainer.args.fp16 = True  # on CPU the arguments refuse fp16 themselves; what a GPU run sees
    with pytest.raises(ValueError, match="bf16=True"):
        trainer.training_step(model, {"input_ids": IDS, "labels": LABELS})
