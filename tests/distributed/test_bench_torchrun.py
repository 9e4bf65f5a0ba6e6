"""`secant bench` under torchrun: two ranks on the global batch give the single-process result,
and rank 0 alone writes the outputs."""

import json
import subprocess
import sys

ARGS = ["-m", "secant", "bench", "--problem", "digits", "--optimizers", "sgd,mlbfgs",
        "--epochs", "1", "--batch-size", "100", "--no-progress"]


def run(cmd, out):
    done = subprocess.run([sys.executable, *cmd, *ARGS, "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_two_ranks_match_one_process(tmp_path):
    multi = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                tmp_path / "multi")
    single = run([], tmp_path / "single")
    assert multi["world_size"] == 2 and single["world_size"] == 1
    for a, b in zip(multi["runs"], single["runs"], strict=True):
        assert a["status"] == b["status"] == "ok"
        assert a["steps"] == b["steps"] > 0
        assert abs(a["final_train_loss"] - b["final_train_loss"]) <= 1e-4 * b["final_train_loss"]


def test_each_rank_takes_its_share_of_the_global_batch(monkeypatch):
    import pytest
    import torch

    from secant.bench import distributed
    from secant.bench.data import BenchError

    idx = torch.arange(10, 22)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        shares.append(distributed.local_rows(idx))
    assert torch.equal(torch.cat(shares), idx) and all(len(s) == 4 for s in shares)
    monkeypatch.setattr(distributed, "world", lambda: (0, 5))
    with pytest.raises(BenchError, match="divisible"):
        distributed.local_rows(idx)
