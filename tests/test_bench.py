"""The speed report's command line (python -m fastadam.bench): matplotlib is optional."""
import json
import sys

import pytest

from fastadam import bench

TINY = ["--sizes", "4096", "--impls", "numpy-textbook", "--threads", "1", "--rounds", "1",
        "--model-rounds", "0", "--context-rounds", "0"]


def test_without_matplotlib_an_asked_for_plot_is_refused_before_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        bench.main([*TINY, "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "measured" not in err
    assert not (tmp_path / "b.json").exists()


def test_without_matplotlib_the_report_is_written_without_a_plot(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.chdir(tmp_path)
    assert bench.main([*TINY, "--json", "b.json"]) == 0
    with open(tmp_path / "b.json") as f:
        report = json.load(f)
    assert [(r["impl"], r["size"], r["threads"]) for r in report["results"]] == [("numpy-textbook", 4096, 1)]
    assert report["results"][0]["median_s"] > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "b.json"]
    assert "no plot: matplotlib is not installed" in capsys.readouterr().err
