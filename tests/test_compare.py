"""`python -m qg.pipeline --compare`: two runs' tables equal but for wall-clock times and the
commit."""

import pandas as pd
import pytest

from qg import pipeline


def _write(root, name, df):
    out = root / "results" / "smoke"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / name, index=False)


def test_compare_ignores_times_and_commit_and_reports_the_first_difference(
    tmp_path, monkeypatch, capsys
):
    a, b = tmp_path / "a", tmp_path / "b"
    tidy = pd.DataFrame(
        {
            "method": ["ptq", "gen", "gen"],
            "metric": ["top1_accuracy", "top1_accuracy", "train_seconds"],
            "value": [84.5, 84.6, 12.0],
            "commit": ["abc", "abc", "abc"],
        }
    )
    runs = pd.DataFrame({"accuracy": [84.5, 84.6], "seconds": [0.1, 0.2]})
    for root, seconds, commit in ((a, 12.0, "abc"), (b, 99.0, "def")):
        _write(root, "table1.csv", tidy.assign(commit=commit, value=[84.5, 84.6, seconds]))
        _write(root, "evaluations.csv", runs.assign(seconds=[seconds, seconds]))
    monkeypatch.setenv("QG_OUTPUT", str(a))
    assert pipeline.compare("smoke", b) == 0
    assert "identical: table1.csv (2 rows)" in capsys.readouterr().out
    _write(b, "table1.csv", tidy.assign(value=[84.5, 84.7, 1.0]))
    assert pipeline.compare("smoke", b) == 1
    out = capsys.readouterr().out
    assert "differs: table1.csv: 1 rows, first 1: {'value': '84.6'} vs {'value': '84.7'}" in out
    (b / "results" / "smoke" / "evaluations.csv").unlink()
    assert pipeline.compare("smoke", b) == 1
    assert "missing: evaluations.csv" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="results/smoke"):
        pipeline.compare("smoke", tmp_path / "nowhere")
