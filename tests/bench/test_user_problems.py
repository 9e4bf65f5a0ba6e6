"""Your own problem: ``--problem FILE.py:FUNCTION`` / ``module:function`` for bench and tune,
the Python API over the same code, and every way a user's file can be wrong (one line,
exit 2, before training)."""

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from secant.bench import BenchError, Dataset, Problem, run, tune
from secant.cli import main

PROBLEM_FILE = '''
import torch
from torch import nn

from secant.bench import Dataset, Problem


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Problem(name="tiny-clf", build=lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(),
                   nn.Linear(8, 2)), data=Dataset(x[:200], x[200:], y[:200], y[200:]),
                   criterion="cross_entropy", batch_size=50, budget_epochs=1, eval_train=100,
                   eval_test=40)
'''


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "tiny.py").write_text(PROBLEM_FILE)
    return f"{tmp_path / 'tiny.py'}:problem"


def _tiny() -> Problem:
    x = torch.randn(120, 4, generator=torch.Generator().manual_seed(1))
    return Problem(name="tiny-reg", build=lambda: nn.Linear(4, 4),
                   data=Dataset(x[:100], x[100:]),
                   criterion=lambda out, x: ((out - x) ** 2).sum(1),  # target = input (no y)
                   batch_size=25, budget_epochs=1, target=0.5)


def test_bench_runs_a_problem_from_a_file(spec, tmp_path):
    out = tmp_path / "res"
    rc = main(["bench", "--problem", spec, "--optimizers", "sgd,kfac", "--out", str(out),
               "--no-progress", "--evals", "2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["config"]["problem"], r["config"]["optimizer"], r["status"])
            for r in res["runs"]] == [("tiny-clf", "sgd", "ok"), ("tiny-clf", "kfac", "ok")]
    assert all(r["steps"] == 4 and r["config"]["batch_size"] == 50 for r in res["runs"])
    assert res["config"]["problem"] == spec
    assert res["problems"]["tiny-clf"]["target"] is None  # not tuned, none set
    assert "tiny-clf" in (out / "report.md").read_text()


def test_tune_then_bench_with_the_users_table(spec, tmp_path):
    table = tmp_path / "mine.json"
    rc = main(["tune", "--problem", spec, "--optimizers", "sgd,adam", "--grid",
               "sgd=0.1:0.3", "--grid", "adam=0.01:0.03", "--write", str(table),
               "--no-progress"])
    assert rc == 0
    doc = json.loads(table.read_text())
    assert doc["format"] == "secant-tuned/1" and set(doc["choices"]) == {"tiny-clf"}
    sgd, target = doc["choices"]["tiny-clf"]["sgd"], doc["targets"]["tiny-clf"]
    assert target["baseline"] in ("sgd", "adam") and target["loss"] > 0
    out = tmp_path / "res"
    rc = main(["bench", "--problem", spec, "--optimizers", "sgd", "--tuned", str(table),
               "--out", str(out), "--no-progress", "--evals", "2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    cfg = res["runs"][0]["config"]
    assert cfg["lr"] == sgd["lr"] and cfg["lr_source"] == "tuned"
    assert res["problems"]["tiny-clf"]["target"] == target["loss"]


def test_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "probs.py").write_text(PROBLEM_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "my_pkg.probs", raising=False)
    rc = main(["bench", "--problem", "my_pkg.probs:problem", "--optimizers", "sgd", "--out",
               "res", "--no-progress", "--evals", "2"])
    assert rc == 0 and (tmp_path / "res" / "results.json").is_file()


def test_python_api_is_the_command(tmp_path):
    p = _tiny()
    out = run(p, optimizers=["sgd", "adam"], out=tmp_path / "api", progress=False,
              lr={"adam": 0.01}, evals=2)
    res = json.loads((out / "results.json").read_text())
    assert [r["config"]["optimizer"] for r in res["runs"]] == ["sgd", "adam"]
    assert res["runs"][1]["config"]["lr"] == 0.01
    assert res["problems"]["tiny-reg"]["target"] == 0.5  # set in the definition
    assert res["config"]["problem"] == "tiny-reg" and "secant.bench.run" in res["command"]
    table = tune(p, optimizers="sgd", grid={"sgd": [0.01, 0.03]}, write=tmp_path / "t.json",
                 progress=False, evals=2)
    assert table.choices["tiny-reg"]["sgd"]["lr"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["choices"] == table.choices
    with pytest.raises(BenchError, match="must be a finite number > 0"):
        run(p, epochs=-1)
    with pytest.raises(BenchError, match="unrecognized arguments: --colour"):
        run(p, colour="red")


BAD_FILES = {
    "missing": (None, "problem", "bad_missing.py not found"),
    "no function": ("x = 1\n", "problem", "defines no 'problem'"),
    "not callable": ("problem = 3\n", "problem", "is not a function"),
    "import raises": ("import no_such_module_here\n", "problem", "ModuleNotFoundError"),
    "syntax error": ("def problem(:\n", "problem", "SyntaxError"),
    "function raises": ("def problem():\n    raise ValueError('no data\\nmore')\n", "problem",
                        "problem() raised ValueError: no data"),
    "wrong type": ("def problem():\n    return {'name': 'x'}\n", "problem",
                   "returned dict, expected a secant.bench.Problem"),
    "bad field": (PROBLEM_FILE.replace("batch_size=50", "batch_size=0"), "problem",
                  "batch_size must be an integer >= 1, got 0"),
    "mean loss": (PROBLEM_FILE.replace('criterion="cross_entropy"',
                                       "criterion=nn.CrossEntropyLoss()"), "problem",
                  "expected one loss per example, shape (2,)"),
    "wrong shapes": (PROBLEM_FILE.replace("nn.Linear(6, 8)", "nn.Linear(5, 8)"), "problem",
                     "the loss of 2 training examples raised RuntimeError"),
    "built-in name": (PROBLEM_FILE.replace('name="tiny-clf"', 'name="digits"'), "problem",
                      "the name of a built-in problem"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_bad_problem_file_one_line_exit_2_before_training(case, command, tmp_path, capsys,
                                                          monkeypatch):
    import secant.bench.cli as cli

    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("training started"))
    source, func, expect = BAD_FILES[case]
    path = tmp_path / f"bad_{case.replace(' ', '_')}.py"
    if source is not None:
        path.write_text(source)
    argv = [command, "--problem", f"{path}:{func}", "--optimizers", "sgd"]
    rc = main(argv + (["--out", str(tmp_path / "o")] if command == "bench" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "o").exists()


def test_problem_spec_needs_a_function():
    with pytest.raises(BenchError, match="name the function too, mine.py:FUNCTION"):
        run("mine.py")


def test_dataset_checks_and_from_torch():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(BenchError, match="y_train must be None or a tensor with one row"):
        Dataset(x, x, y[:9], y)
    with pytest.raises(BenchError, match="both y_train and y_test"):
        Dataset(x, x, y, None)
    from torch.utils.data import TensorDataset

    d = Dataset.from_torch(TensorDataset(x, y), TensorDataset(x[:4], y[:4]))
    assert torch.equal(d.x_train, x) and torch.equal(d.y_train, y)
    assert torch.equal(d.x_test, x[:4]) and torch.equal(d.y_test, y[:4])
    d = Dataset.from_torch(TensorDataset(x), TensorDataset(x[:4]))  # inputs alone
    assert torch.equal(d.x_test, x[:4]) and d.y_train is None and d.y_test is None
    pairs = [(torch.full((2,), float(i)), i) for i in range(5)]  # items of a typical dataset
    d = Dataset.from_torch(pairs, pairs)
    assert d.x_train.shape == (5, 2) and d.y_train.tolist() == [0, 1, 2, 3, 4]


def test_layer_optimizers_follow_the_model():
    from secant.bench.problems import get_problem

    assert _tiny().layer_optimizers is True
    assert get_problem("quadratic").layer_optimizers is False
    p = Problem(name="vec", build=lambda: nn.ParameterList([nn.Parameter(torch.zeros(3))]),
                data=_tiny().data, criterion="output", batch_size=5, budget_epochs=1)
    assert p.layer_optimizers is False


def test_loader_errors_are_one_line():
    def loader(data_dir, synthetic):
        raise FileNotFoundError(f"{data_dir}/x.pt")

    p = Problem(name="lazy", build=lambda: nn.Linear(2, 2), data=loader,
                criterion="output", batch_size=5, budget_epochs=1)
    with pytest.raises(BenchError, match="loading its data raised FileNotFoundError: d/x.pt"):
        p.load("d", False)
    p.data = lambda data_dir, synthetic: [1, 2]
    with pytest.raises(BenchError, match="data loader returned list"):
        p.load(None, False)


def test_docs_example_runs(tmp_path):
    """The worked example of docs/bench.md, as written there, loads and checks out."""
    from pathlib import Path

    from secant.bench import user_problems

    doc = (Path(__file__).parents[2] / "docs" / "bench.md").read_text()
    code = doc.split("A\ncomplete example, `my_problem.py`:\n\n```python\n")[1].split("```")[0]
    (tmp_path / "my_problem.py").write_text(textwrap.dedent(code))
    p = user_problems.load(f"{tmp_path / 'my_problem.py'}:problem")
    p.check(p.load())
    assert p.name == "my-mlp" and p.layer_optimizers
