"""``secant bench`` / ``secant tune`` end to end with tiny budgets, and bad input."""

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
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--suite", "quick", "--problem", "digits"], "not allowed with argument"),
])
def test_bad_input_one_line_nonzero(argv, expect, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        rc = main(["bench", *argv, "--out", str(tmp_path / "x")])
        raise SystemExit(rc)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1


def _no_training(monkeypatch):
    import secant.bench.cli as cli

    def fail(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "run_one", fail)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_corrupt_compressed_file_rejected_before_training(command, suffix, tmp_path, capsys,
                                                          monkeypatch):
    import bz2
    import gzip
    import io
    import lzma
    import zipfile

    def zipped(raw):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("train-images-idx3-ubyte", raw)
        return buf.getvalue()

    _no_training(monkeypatch)
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".zip": zipped}[suffix]
    blob = bytearray(compress(bytes(range(256)) * 64))
    blob[len(blob) // 2 : len(blob) // 2 + 8] = b"\xff" * 8  # a valid header, a corrupt body
    name = "train-images-idx3-ubyte" + suffix
    (tmp_path / name).write_bytes(bytes(blob))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    rc = main([command, "--problem", "mnist", "--optimizers", "sgd", "--data-dir",
               str(tmp_path)] + (["--out", str(tmp_path / "o")] if command == "bench" else []))
    assert rc == 2
    err = capsys.readouterr().err
    assert name in err and "corrupt" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("what", ["file", "earlier results"])
def test_out_that_exists_is_rejected_before_training(what, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    out = tmp_path / "out"
    if what == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "results.json").write_text("{}")
    rc = main(["bench", "--problem", "quadratic", "--epochs", "1", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(out) in err and len(err.strip().splitlines()) == 1
    assert (out.read_text() == "x") if what == "file" else \
        (out / "results.json").read_text() == "{}"  # untouched


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
    for opt in ("--suite", "--problem", "--optimizers", "--budget-seconds", "--epochs",
                "--seeds", "--batch-size", "--lr", "--device", "--data-dir", "--out", "--list",
                "--tuned", "FILE.py:FUNCTION", "10 minutes", "verdict"):
        assert opt in text


def test_tune_help_offers_no_list(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = capsys.readouterr().out
    assert "--list" not in text and "--tune-seeds" in text and "--suite" in text
    assert "--write PATH" in text and "--write-package" in text and "FILE.py:FUNCTION" in text


def test_list_and_version(capsys):
    assert main(["bench", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("quick", "paper-ae", "paper-cnn", "all", "curves", "mnist", "mnist1d",
                 "digits", "quadratic", "cifar10", "sgd", "sgd-norm", "adamw", "muon", "soap",
                 "mlbfgs"):
        assert f"  {name} " in text
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "secant" in capsys.readouterr().out


def test_tune_writes_table_and_target(tmp_path):
    table = tmp_path / "tuned.json"
    md = tmp_path / "tuning.md"
    rc = main(["tune", "--problem", "quadratic", "--optimizers", "sgd,adam", "--epochs", "1",
               "--grid", "sgd=1e-3:3e-3:1000", "--grid", "adam=0.01:0.03:0.1", "--write",
               str(table), "--markdown", str(md), "--no-progress"])
    assert rc == 0
    doc = json.loads(table.read_text())
    sgd = doc["choices"]["quadratic"]["sgd"]
    assert sgd["lr"] != 1000  # lr 1000 diverges: never chosen
    assert any(p["lr"] == 1000 and p["loss"] is None for p in sgd["points"])
    tgt = doc["targets"]["quadratic"]
    assert tgt["loss"] > 0 and tgt["baseline"] in ("sgd", "adam")
    assert tgt["seeds"] == [1000, 1001, 1002] and "best tuned baseline" in tgt["how"]
    assert "tried:" in md.read_text()


@pytest.mark.parametrize("argv, expect", [
    (["--problem", "quadratic", "--optimizers", "kfac"],
     "nothing to run on quadratic: its model has no Linear or Conv2d layer"),
    (["--problem", "quadratic", "--optimizers", "kfac,kbfgs"], "(kfac, kbfgs)"),
    (["--problem", "quadratic", "--optimizers", "sgd,kbfgs"],
     "nothing to run for kbfgs: it works only on Linear and Conv2d layers"),
])
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_nothing_to_run_exits_2_before_training(command, argv, expect, tmp_path, capsys,
                                                monkeypatch):
    _no_training(monkeypatch)
    rc = main([command, *argv] + (["--out", str(tmp_path / "o")] if command == "bench" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "o").exists()


def test_suites_resolve_to_known_problems():
    from secant.bench.problems import PROBLEMS
    from secant.bench.suites import SUITES

    assert list(SUITES) == ["quick", "paper-ae", "paper-cnn", "all"]
    for s in SUITES.values():
        assert set(s.epochs) <= set(PROBLEMS) and s.seeds >= 3
    assert SUITES["paper-ae"].problems(None) == ["curves"]
    assert SUITES["paper-ae"].problems("data") == ["curves", "mnist"]
    assert all(PROBLEMS[p].batch_size == 1000 for p in SUITES["paper-ae"].epochs)
    assert set(SUITES["all"].epochs) == set().union(*(SUITES[n].epochs for n in
                                                      ("quick", "paper-ae", "paper-cnn")))


def test_suite_run_verdict_first(tmp_path, monkeypatch, capsys):
    from secant.bench import suites

    monkeypatch.setitem(suites.SUITES, "quick", suites.Suite(
        "quick", "test", {"quadratic": 1}, seeds=3))
    out = tmp_path / "q"
    rc = main(["bench", "--optimizers", "sgd,mlbfgs", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["config"]["seed"] for r in res["runs"]) == [0, 0, 1, 1, 2, 2]
    assert all(r["config"]["epochs"] == 1 for r in res["runs"])
    report = (out / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## quadratic")
    assert "quadratic" in res["verdicts"]


def test_tune_knob_grid_fixes_the_knob(tmp_path):
    md = tmp_path / "tuning.md"
    rc = main(["tune", "--problem", "quadratic", "--optimizers", "adamw", "--epochs", "1",
               "--grid", "adamw=0.01:0.1", "--knob-grid", "adamw=3e-4", "--markdown", str(md),
               "--no-progress"])
    assert rc == 0
    text = md.read_text()
    assert "weight_decay 0.0003" in text and "fixed, not searched" in text
    assert "weight_decay 0.01" not in text  # the registry's grid was not searched


@pytest.mark.parametrize("flag", [["--knob-grid", "sgd=0.1"], ["--knob-grid", "adamw=-1"],
                                  ["--grid", "sgd=0.1"]])
def test_tune_grid_flags_checked_before_training(flag, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    rc = main(["tune", "--problem", "quadratic", "--optimizers", "sgd,adamw", *flag])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and flag[0] in err


def test_suite_contenders_limit_the_optimizers(monkeypatch):
    import argparse

    from secant.bench.cli import _resolve

    args = argparse.Namespace(problem=None, suite="paper-ae", optimizers=None, data_dir=None,
                              device="cpu", threads=None)
    _, entries = _resolve(args)
    assert [e.name for e in entries] == ["sgd", "adam", "kfac", "kbfgs", "kbfgsl"]
    args.optimizers = "adamw,kbfgs"  # an explicit list wins
    assert [e.name for e in _resolve(args)[1]] == ["adamw", "kbfgs"]


def test_jobs_give_the_same_runs_in_the_same_order(tmp_path):
    def runs(jobs):
        out = tmp_path / f"j{jobs}"
        rc = main(["bench", "--problem", "quadratic", "--optimizers", "sgd,adam", "--seeds", "2",
                   "--epochs", "1", "--jobs", str(jobs), "--out", str(out), "--no-progress"])
        assert rc == 0
        return json.loads((out / "results.json").read_text())["runs"]

    one, two = runs(1), runs(2)
    key = [(r["config"]["optimizer"], r["config"]["seed"]) for r in one]
    assert key == [("sgd", 0), ("sgd", 1), ("adam", 0), ("adam", 1)]
    assert [(r["config"]["optimizer"], r["config"]["seed"]) for r in two] == key
    assert [[p["train_loss"] for p in r["curve"]] for r in two] == \
        [[p["train_loss"] for p in r["curve"]] for r in one]
