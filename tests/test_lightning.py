"""Lightning's automatic optimization with every optimizer: ``configure_optimizers`` returns the
secant optimizer, Lightning passes its closure to ``step`` (K-BFGS calls it twice), and a fit
gives the same parameters as the plain PyTorch loop over the same batches."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from every_optimizer import EVERY_OPTIMIZER
from torch import nn

L = pytest.importorskip("lightning")

GEN = torch.Generator().manual_seed(0)
X = torch.randn(48, 6, generator=GEN)
Y = torch.randint(0, 3, (48,), generator=GEN)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class Module(L.LightningModule):
    def __init__(self, name):
        super().__init__()
        self.name = name
        self.net = net()

    def training_step(self, batch, index):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return EVERY_OPTIMIZER[self.name](self)


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16)


def fit(module, precision):
    trainer = L.Trainer(max_epochs=3, precision=precision, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers and loggers
        trainer.fit(module, loader())


@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_lightning_fit_equals_the_plain_loop(name):
    module = Module(name)
    fit(module, "32-true")
    ref = net()
    opt = EVERY_OPTIMIZER[name](ref)
    for _ in range(3):
        for x, y in loader():
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(ref(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert max((p - q).abs().max() for p, q in zip(ref.parameters(), net().parameters())) > 1e-3


@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_lightning_bf16_mixed_trains(name):
    module = Module(name)
    with torch.no_grad():
        start = float(F.cross_entropy(module.net(X), Y))
    fit(module, "bf16-mixed")
    with torch.no_grad():
        assert float(F.cross_entropy(module.net(X), Y)) < start
