"""The report's rules: one statistic over seeds written one way (the verdict and the tables
agree), "not reached" spelled out, the every-seed verdict read from the range shown, strict
JSON, no empty table."""

import json
import math

import pytest

from secant.bench import report

INF = math.inf


def _run(opt, seed, losses, status="ok", step_time=0.01, problem="p"):
    """A finished run evaluated every 10 steps with these training losses."""
    curve = [{"step": 10 * i, "time": 10 * i * step_time, "train_loss": v, "test_loss": v * 1.1}
             for i, v in enumerate(losses)]
    run = {"config": {"problem": problem, "optimizer": opt, "lr": 0.1, "lr_source": "tuned",
                      "seed": seed, "knob": {}},
           "status": status, "message": "" if status == "ok" else "train loss above the ceiling",
           "curve": curve, "steps": curve[-1]["step"], "median_step_time": step_time,
           "opt_state_bytes": 1024}
    if status == "ok":
        run |= {"final_train_loss": losses[-1], "final_test_loss": 1.1 * losses[-1]}
    return run


# soap reaches 1.0 at steps 30, 30, 40; kbfgs at 20 and 30, and never on seed 2
RUNS = [_run("soap", 0, [9, 5, 2, 1, 0.5]), _run("soap", 1, [9, 5, 2, 1, 0.5]),
        _run("soap", 2, [9, 5, 2, 1.5, 1]),
        _run("kbfgs", 0, [9, 2, 1, 0.5, 0.4], step_time=0.05),
        _run("kbfgs", 1, [9, 3, 2, 1, 0.45], step_time=0.05),
        _run("kbfgs", 2, [9, 3, 2, 1.5, 1.2], step_time=0.05)]


def _summary_and_verdict(runs=RUNS, targets=None):
    runs = [dict(r) for r in runs]
    summary = report.summarize(runs, targets or {"p": 1.0})
    return summary, report.verdicts(runs, summary)


def _cell(summary, opt, column):
    row = next(r for r in report.table_rows(summary, "p") if r[0] == opt)
    return row[report.HEADER.index(column)]


def test_verdict_and_table_write_the_same_steps_for_a_not_reached_seed():
    summary, verdict = _summary_and_verdict()
    v = verdict["p"]
    assert (v["best_secant"], v["best_baseline"]) == ("kbfgs", "soap")
    row = report.verdict_rows(verdict, {"p": 1.0})[0]
    secant = row[report.VERDICT_HEADER.index("best secant: steps to target")]
    baseline = row[report.VERDICT_HEADER.index("best baseline: steps to target")]
    assert secant == "kbfgs: " + _cell(summary, "kbfgs", "steps to target")
    assert baseline == "soap: " + _cell(summary, "soap", "steps to target")
    # median over the three seeds with the missed seed counted as ∞, and the count shown
    assert secant == "kbfgs: 30 [20–∞] (2/3 reached)"
    assert baseline == "soap: 30 [30–40]"


def test_not_reached_is_spelled_out_never_zero():
    summary, verdict = _summary_and_verdict(targets={"p": 0.4})  # kbfgs on seed 0 only
    assert _cell(summary, "soap", "steps to target") == "not reached on any of 3 seeds"
    assert _cell(summary, "kbfgs", "steps to target") == "not reached [40–∞] (1/3 reached)"
    assert _cell(summary, "soap", "final train loss") == "0.5 [0.5–1]"
    row = report.verdict_rows(verdict, {"p": 0.4})[0]
    assert row[2] == "nobody"
    assert row[5] == "neither reached (per seed: baseline not reached, neither reached, " \
                     "neither reached)"
    for target in (0.1, 0.4, 1.0):
        summary, verdict = _summary_and_verdict(targets={"p": target})
        cells = report.verdict_rows(verdict, {"p": target})[0][3:]
        cells += [text for row in report.table_rows(summary, "p") for text in row[3:8]]
        assert not any(text.startswith(("0 ", "0×", "0.00")) or text == "0" for text in cells)


def test_a_run_that_did_not_finish_has_no_final_loss():
    runs = RUNS[:3] + [_run("soap", 3, [9, 20], status="diverged")]
    summary, _ = _summary_and_verdict(runs)
    assert _cell(summary, "soap", "status") == "diverged/ok (3/4 ok)"
    assert _cell(summary, "soap", "final train loss") == "0.75 [0.5–∞] (3/4 finished)"
    assert _cell(summary, "soap", "steps to target") == "35 [30–∞] (3/4 reached)"


@pytest.mark.parametrize("stat, text", [
    ({"median": 5, "min": 4, "max": 6, "finite": 3, "n": 3}, "5 [4–6]"),
    ({"median": 5, "min": 4, "max": INF, "finite": 2, "n": 3}, "5 [4–∞] (2/3 reached)"),
    ({"median": 7, "min": 7, "max": 7, "finite": 1, "n": 1}, "7"),
    ({"median": INF, "min": INF, "max": INF, "finite": 0, "n": 1}, "not reached"),
])
def test_seeds_text(stat, text):
    assert report.seeds_text(stat, ".0f") == text


def test_every_seed_verdict_matches_the_ranges_beside_it():
    # in steps kbfgs trails soap on every seed where either reaches; in projected time too
    summary, verdict = _summary_and_verdict()
    v = verdict["p"]
    assert v["factor_steps"]["every_seed"] is None  # seed 0: kbfgs 20 < soap 30
    row = report.verdict_rows(verdict, {"p": 1.0})[0]
    assert row[5] == "1.00× (per seed: 1.50×, 1.00×, secant not reached)"
    assert row[7] == "steps: no (mixed); time: yes, baseline faster"
    assert max(r for r in v["factor_time"]["per_seed"] if r is not None) < 1
    # a secant win in steps but not in time is said so, not as one verdict for both
    runs = [_run("soap", s, [9, 5, 2, 1]) for s in range(3)] + [
        _run("kbfgs", s, [9, 1, 1, 1], step_time=0.05 - 0.02 * s) for s in range(3)]
    _, verdict = _summary_and_verdict(runs)
    row = report.verdict_rows(verdict, {"p": 1.0})[0]
    assert row[5] == "3.00×" and row[6] == "1.00× [0.60–3.00]"
    assert row[7] == "steps: yes, secant faster; time: no (mixed)"


def _reject(name):
    raise ValueError(f"not strict JSON: {name}")


def test_strict_json_round_trip():
    results = {"a": INF, "b": [-INF, math.nan, 1.5, None], "c": {"d": {"e": INF}}, "f": "x"}
    text = report.strict_json(results)
    loaded = json.loads(text, parse_constant=_reject)  # raises on Infinity / NaN
    assert loaded["a"] == "Infinity" and loaded["b"][:2] == ["-Infinity", "NaN"]
    back = report._decode(loaded)
    assert back["a"] == INF and back["b"][0] == -INF and math.isnan(back["b"][1])
    assert back["b"][2:] == [1.5, None] and back["c"]["d"]["e"] == INF and back["f"] == "x"


def _tables(md):
    """Every markdown table in ``md`` as its list of body rows."""
    tables, rows, in_table = [], None, False
    for line in md.splitlines() + [""]:
        if line.startswith("|") and not in_table:
            in_table, rows = True, []
        elif line.startswith("|") and not line.startswith("|---"):
            rows.append(line)
        elif not line.startswith("|") and in_table:
            in_table = False
            tables.append(rows)
    return tables


META = {"command": "secant bench (test)", "note": "", "started": "2026-01-01T00:00:00",
        "versions": {"secant": "0", "torch": "0", "numpy": "0", "python": "3"},
        "machine": {"platform": "test", "cpu_count": 2, "torch_threads": 1, "device": "cpu"},
        "config": {"epochs": None, "budget_seconds": None, "seeds": 3}}


def test_written_outputs_strict_json_no_empty_table_and_rerender(tmp_path):
    runs = [dict(r, config=dict(r["config"], problem=p)) for p in ("p", "q") for r in RUNS]
    runs.append(_run("kfac", 0, [9, math.inf], status="diverged", problem="q"))
    info = {p: {"description": p, "target": 1.0 if p == "p" else 0.1, "target_note": "test",
                "budget_epochs": 1} for p in ("p", "q")}
    report.write_outputs(tmp_path, dict(META, machine=dict(META["machine"])), info, runs)
    text = (tmp_path / "results.json").read_text()
    json.loads(text, parse_constant=_reject)
    md = (tmp_path / "report.md").read_text()
    assert all(_tables(md)), "a table with no rows"
    assert "No geometric-mean speedup against Adam" in md  # no adam run: sentence, no table
    assert (tmp_path / "performance_profile.png").is_file()
    before = report.load_results(tmp_path / "results.json")
    report.rerender(tmp_path)
    after = report.load_results(tmp_path / "results.json")
    assert after["verdicts"] == before["verdicts"] and after["summary"] == before["summary"]
    assert "re-rendered from the runs" in (tmp_path / "report.md").read_text()
    json.loads((tmp_path / "results.json").read_text(), parse_constant=_reject)


def test_across_problems_lists_only_optimizers_with_a_speedup():
    lines = report._across_problems({"adam": (1.0, 2), "sgd": (None, 0), "kfac": (1.5, 1)})
    assert "| adam | 1.00 | 2 |" in lines and "| kfac | 1.50 | 1 |" in lines
    assert not any("sgd" in line for line in lines)
