"""The runner starts a notebook's kernel again when it died while starting (a port taken by another
kernel starting at the same time), and only then."""

import pytest

from qg import pipeline


def test_a_kernel_that_died_while_starting_is_started_again(tmp_path, monkeypatch, capsys):
    calls = []

    def flaky(source, out, params):
        calls.append(source.name)
        if len(calls) == 1:
            raise RuntimeError(pipeline.KERNEL_START_FAILED)

    monkeypatch.setattr(pipeline, "_execute", flaky)
    pipeline._run_one("01_collect", tmp_path, {}, "smoke")
    assert calls == ["01_collect.ipynb", "01_collect.ipynb"]
    assert "starting it again" in capsys.readouterr().out


def test_any_other_failure_is_raised_at_once(tmp_path, monkeypatch):
    calls = []

    def broken(source, out, params):
        calls.append(source.name)
        raise RuntimeError("something else")

    monkeypatch.setattr(pipeline, "_execute", broken)
    with pytest.raises(RuntimeError, match="something else"):
        pipeline._run_one("01_collect", tmp_path, {}, "smoke")
    assert len(calls) == 1
