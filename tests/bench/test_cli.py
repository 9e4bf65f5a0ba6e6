"""``secant bench`` / ``secant tune`` end to end with tiny budgets, and bad input."""

import importlib.util
import json

import pytest
import torch

from secant.cli import main


def test_bench_smoke_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "res"
    torch.set_num_threads(2)
    rc = main(["bench", "--problem", "digits", "--optimizers", "sgd,adam,mlbfgs",
               "--budget-seconds", "0.4", "--evals", "3", "--out", str(out), "--no-progress",
               "--lr", "adam=0.002"])
    assert rc == 0
    assert torch.get_num_threads() == 2  # --threads (default 1) is restored afterwards
    for name in ("results.json", "loss_vs_step.png", "loss_vs_time.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert [r["config"]["optimizer"] for r in res["runs"]] == ["sgd", "adam", "mlbfgs"]
    adam = res["runs"][1]
    assert adam["config"]["lr"] == 0.002 and adam["config"]["lr_source"] == "override"
    assert all(r["status"] == "ok" and len(r["curve"]) >= 2 for r in res["runs"])
    assert res["versions"]["torch"] and res["machine"]["cpu_count"]
    report = (out / "report.md").read_text()
    assert "| adam |" in report and "![loss_vs_time.png](loss_vs_time.png)" in report
    printed = capsys.readouterr().out
    assert "final train loss" in printed and "mlbfgs" in printed


def test_bench_several_problems_profile_and_divergence(tmp_path):
    out = tmp_path / "multi"
    rc = main(["bench", "--problem", "digits-clf,quadratic", "--optimizers", "sgd,adam",
               "--epochs", "1", "--out", str(out), "--no-progress", "--lr", "sgd=1000"])
    assert rc == 0
    assert (out / "performance_profile.png").is_file()
    res = json.loads((out / "results.json").read_text())
    status = {(r["config"]["problem"], r["config"]["optimizer"]): r["status"]
              for r in res["runs"]}
    assert status[("quadratic", "sgd")] == "diverged"  # recorded, and the others went on
    assert status[("quadratic", "adam")] == "ok" and status[("digits-clf", "adam")] == "ok"
    assert "adam" in res["geomean_speedup_vs_adam"]


@pytest.mark.parametrize("argv, expect", [
    (["--problem", "nope"], "unknown problem 'nope'"),
    (["--optimizers", "adam,nope"], "unknown optimizer 'nope'"),
    (["--budget-seconds", "-5"], "must be a finite number > 0"),
    (["--epochs", "0"], "must be a finite number > 0"),
    (["--lr", "adam"], "expected OPT=VALUE"),
    (["--lr", "adam=-1"], "must be a finite number > 0"),
    (["--problem", "mnist"], "train-images-idx3-ubyte"),
    (["--problem", "cifar10"], "--synthetic"),
])
def test_bad_input_one_line_nonzero(argv, expect, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        rc = main(["bench", *argv, "--out", str(tmp_path / "x")])
        raise SystemExit(rc)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1


def test_malformed_data_file_one_line(tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    rc = main(["bench", "--problem", "mnist", "--data-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and len(err.strip().splitlines()) == 1


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for opt in ("--problem", "--optimizers", "--budget-seconds", "--epochs", "--seeds",
                "--batch-size", "--lr", "--device", "--data-dir", "--out", "--list",
                "10 minutes"):
        assert opt in text


def test_list_and_version(capsys):
    assert main(["bench", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("curves", "mnist", "digits", "quadratic", "cifar10", "sgd", "adam", "mlbfgs"):
        assert f"  {name} " in text
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "secant" in capsys.readouterr().out


def test_tune_writes_table_and_target(tmp_path):
    table = tmp_path / "tuned.py"
    md = tmp_path / "tuning.md"
    rc = main(["tune", "--problem", "quadratic", "--optimizers", "sgd,adam", "--epochs", "1",
               "--grid", "sgd=1e-3:1000", "--grid", "adam=0.01:0.1", "--write", str(table),
               "--markdown", str(md), "--no-progress"])
    assert rc == 0
    spec = importlib.util.spec_from_file_location("tuned_tmp", table)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TUNED["lrs"]["quadratic"]["sgd"] == 1e-3  # lr 1000 diverges
    assert mod.TUNED["lrs"]["quadratic"]["adam"] in (0.01, 0.1)
    tgt = mod.TUNED["targets"]["quadratic"]
    assert tgt["loss"] > 0 and "Adam" in tgt["how"]
    assert "**best**" in md.read_text()
