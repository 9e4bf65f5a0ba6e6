"""Tuning tables: the package's JSON, ``tune --write`` checked before training (never over a
file tune did not write, never inside the package), atomic writes that keep what a crashed
run already chose, and ``bench --tuned``."""

import json
import os
from pathlib import Path

import pytest

import secant
from secant.bench import tuned_table as T
from secant.bench.problems import get_problem
from secant.bench.registry import OPTIMIZERS
from secant.cli import main

TUNE = ["tune", "--problem", "quadratic", "--optimizers", "sgd,adam", "--epochs", "1",
        "--grid", "sgd=1e-3:3e-3", "--grid", "adam=0.03:0.1", "--no-progress"]


def _no_training(monkeypatch):
    import secant.bench.cli as cli

    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("training started"))


def test_package_table_is_json_read_by_code():
    doc = json.loads(T.PACKAGE_FILE.read_text())
    assert doc["format"] == T.FORMAT
    assert not (T.PACKAGE_FILE.parent / "tuned.py").exists()  # generated Python is gone
    table = T.package()
    lr, knob, source = table.settings(OPTIMIZERS["kbfgs"], "curves")
    assert (lr, knob, source) == (doc["choices"]["curves"]["kbfgs"]["lr"],
                                  doc["choices"]["curves"]["kbfgs"]["knob"], "tuned")
    assert table.settings(OPTIMIZERS["adamw"], "quadratic") == (1e-3, {"weight_decay": 1e-2},
                                                                "default")
    assert table.target(get_problem("digits"))[0] == doc["targets"]["digits"]["loss"]
    assert table.target(get_problem("quadratic"))[0] is None


def test_tune_writes_a_new_file_then_updates_its_own(tmp_path, capsys):
    path = tmp_path / "mine.json"
    assert main([*TUNE, "--write", str(path)]) == 0
    first = json.loads(path.read_text())
    assert set(first["choices"]["quadratic"]) == {"sgd", "adam"}
    assert "quadratic" in first["targets"] and "curves" not in first["choices"]  # mine only
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]  # no temporary file left
    # tune's own file is accepted and updated: the optimizer tuned now replaces its entry
    assert main([*TUNE[:4], "sgd", *TUNE[5:], "--grid", "sgd=0.01:0.03", "--write",
                 str(path)]) == 0
    second = json.loads(path.read_text())
    assert second["choices"]["quadratic"]["adam"] == first["choices"]["quadratic"]["adam"]
    assert second["choices"]["quadratic"]["sgd"]["points"] != \
        first["choices"]["quadratic"]["sgd"]["points"]


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
        return folder
    if not Path("/proc").is_dir():
        pytest.skip("no read-only folder for root here")
    return Path("/proc")  # nobody creates files there, root included


@pytest.mark.parametrize("case, expect", [
    ("unrelated file", "exists and is not a table secant tune wrote; refusing to overwrite"),
    ("unrelated json", "exists and is not a table secant tune wrote"),
    ("folder", "is a folder"),
    ("missing folder", "does not exist"),
    ("inside package", "inside the installed secant package"),
    ("package table", "inside the installed secant package"),
    ("unwritable", "cannot write in folder"),
])
def test_write_target_refused_before_training(case, expect, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    package = Path(secant.__file__).resolve().parent
    path = {"unrelated file": tmp_path / "notes.txt", "unrelated json": tmp_path / "cfg.json",
            "folder": tmp_path, "missing folder": tmp_path / "nope" / "t.json",
            "inside package": package / "bench" / "mine.json",
            "package table": T.PACKAGE_FILE,
            "unwritable": _unwritable_folder(tmp_path) / "t.json"}[case]
    if case == "unrelated file":
        path.write_text("my notes")
    if case == "unrelated json":
        path.write_text('{"choices": {}}')
    before = path.read_bytes() if path.is_file() else None
    rc = main([*TUNE, "--write", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert (path.read_bytes() if path.is_file() else None) == before  # untouched
    assert not (package / "bench" / "mine.json").exists()


@pytest.mark.parametrize("where, expect", [("missing folder", "does not exist"),
                                           ("inside package", "inside the installed secant")])
def test_markdown_target_checked_before_training(where, expect, tmp_path, capsys,
                                                 monkeypatch):
    _no_training(monkeypatch)
    path = {"missing folder": tmp_path / "nope" / "log.md",
            "inside package": T.PACKAGE_FILE.with_name("log.md")}[where]
    rc = main([*TUNE, "--markdown", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--markdown" in err and expect in err
    assert not path.exists()


def test_a_crash_keeps_what_was_already_chosen(tmp_path, monkeypatch):
    import secant.bench.cli as cli

    real = cli.run_one

    def crash_on_adam(problem, entry, data, cfg, progress=True):
        if entry.name == "adam":
            raise KeyboardInterrupt
        return real(problem, entry, data, cfg, progress=progress)

    monkeypatch.setattr(cli, "run_one", crash_on_adam)
    path = tmp_path / "mine.json"
    with pytest.raises(KeyboardInterrupt):
        main([*TUNE, "--write", str(path)])
    kept = json.loads(path.read_text())
    assert kept["format"] == T.FORMAT and kept["choices"]["quadratic"]["sgd"]["lr"] > 0
    assert "adam" not in kept["choices"]["quadratic"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]


def test_atomic_write_leaves_the_old_table_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    T.write(T.TunedTable({"p": {"sgd": {"lr": 0.1}}}), path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        T.write(T.TunedTable({"p": {"sgd": {"lr": 0.3}}}), path)
    assert T.read(path).choices == {"p": {"sgd": {"lr": 0.1}}}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_users_table_read_over_the_package(tmp_path):
    mine = T.TunedTable({"digits": {"adam": {"lr": 0.5, "knob": {}}}},
                        {"digits": {"loss": 1.0, "how": "mine"}})
    table = mine.over(T.package())
    assert table.settings(OPTIMIZERS["adam"], "digits") == (0.5, {}, "tuned")
    assert table.settings(OPTIMIZERS["sgd"], "digits")[2] == "default"  # digits: mine only
    assert table.choices["curves"] == T.package().choices["curves"]  # others: the package's
    assert table.target(get_problem("digits")) == (1.0, "mine")


@pytest.mark.parametrize("content, expect", [
    (None, "no such file"), ("x = 1", "not a table written by secant tune"),
    ('{"a": 1}', '"format": "secant-tuned/1"'),
    ('{"format": "secant-tuned/1", "choices": []}', "malformed table")])
def test_bench_tuned_must_be_a_tune_table(content, expect, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    rc = main(["bench", "--problem", "quadratic", "--tuned", str(path), "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err and "--tuned" in err
