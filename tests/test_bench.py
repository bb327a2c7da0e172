"""The objective head-to-head's report: time to reach Flow-GRPO's final score, and merging parallel runs."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import load_launch_script

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    return load_launch_script("bench_flow_objectives.py")


def curve(points):
    return [{"epoch": i * 10, "time": t, "geneval_overall": s} for i, (t, s) in enumerate(points)]


def test_time_to_reach_and_ratio_against_flow_grpo():
    bench = load_bench()
    curves = {"flow_grpo": curve([(0, 0.20), (300, 0.24), (900, 0.30)]),
              "nft": curve([(0, 0.20), (150, 0.31), (900, 0.40)]),
              "awm": curve([(0, 0.20), (900, 0.25)])}
    rows = {line.split("|")[1].strip(): line for line in bench.table(curves).splitlines()[2:]}
    assert "| 900 | 1.00x |" in rows["flow_grpo"]
    assert "| 150 | 0.17x |" in rows["nft"]  # 150 s / 900 s
    assert "not reached" in rows["awm"]


def test_no_target_when_flow_grpo_does_not_improve():
    bench = load_bench()
    curves = {"flow_grpo": curve([(0, 0.30), (900, 0.25)]), "nft": curve([(0, 0.30), (900, 0.40)])}
    assert all("| n/a | - |" in line for line in bench.table(curves).splitlines()[2:])


def test_merge_names_a_run_without_curves(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(tmp_path / "m"), "--merge", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="missing: no curves.json"):
        bench.main()


def test_merge_combines_parallel_runs(tmp_path, monkeypatch):
    bench = load_bench()
    for name, points in [("flow_grpo", [(0, 0.2), (900, 0.3)]), ("nft", [(0, 0.2), (100, 0.35)])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "curves.json").write_text(json.dumps({name: curve(points)}))
    out = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(out), "--merge", str(tmp_path / "nft"),
                                      str(tmp_path / "flow_grpo")])
    bench.main()
    lines = (out / "bench.md").read_text().splitlines()
    assert lines[2].startswith("| flow_grpo |") and lines[3].startswith("| nft |")
    assert "| 100 | 0.11x |" in lines[3]
    assert set(json.loads((out / "curves.json").read_text())) == {"flow_grpo", "nft"}
    assert (out / "bench.png").stat().st_size > 0
