"""The scripts in ``examples/`` run as a user would run them, at tiny sizes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*cmd):
    done = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def losses(out):
    return [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]


@pytest.mark.parametrize("optimizer", ["kfac", "kbfgs"])
def test_causal_lm_example(optimizer):
    pytest.importorskip("transformers")
    out = run(EXAMPLES / "causal_lm_kfac.py", "--optimizer", optimizer, "--steps", "10",
              "--width", "64")
    assert "of the parameters get curvature" in out
    found = losses(out)
    assert len(found) >= 3 and found[-1] < found[0]


def test_cnn_example():
    out = run(EXAMPLES / "cnn_mlbfgs.py", "--steps", "60")
    assert float(re.search(r"training accuracy ([0-9.]+)", out).group(1)) > 0.9


def test_ddp_example_under_torchrun():
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              EXAMPLES / "ddp_torchrun.py", "--optimizer", "kfac", "--steps", "12")
    found = losses(out)
    assert len(found) >= 3 and found[-1] < found[0]


@pytest.mark.parametrize("optimizer", ["mlbfgs", "neumann", "kbfgs"])
def test_fsdp2_example_under_torchrun(tmp_path, optimizer):
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              EXAMPLES / "fsdp2_torchrun.py", "--optimizer", optimizer, "--steps", "24",
              "--checkpoint", tmp_path / "ckpt")
    assert "resumed from" in out
    found = losses(out)
    assert len(found) >= 3 and found[-1] < found[0]
