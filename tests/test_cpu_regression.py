"""tools/cpu_regression.py: the per-round ratio arithmetic, skips and failures, the generated docs section, and one
real run of two worker processes (each importing its own tree)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "_tool_cpu_regression", ROOT / "tools" / "cpu_regression.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakeWorker:
    """Answers build/time like a worker; ``times`` are returned in order; records the call order."""

    def __init__(self, label, log, times, first_s=0.1, build_error=None, tree=ROOT):
        self.label, self.log, self.times, self.first_s, self.build_error = (
            label,
            log,
            list(times),
            first_s,
            build_error,
        )
        self.tree = self.file_root = tree

    def ask(self, op, **req):
        self.log.append((self.label, op))
        if op == "build":
            if self.build_error:
                return {"error": self.build_error}
            return {"first_s": self.first_s, "file": str(self.file_root / "visattn" / "__init__.py")}
        return {"ms": self.times.pop(0)}

    def close(self):
        self.log.append((self.label, "close"))


SHAPE = {"batch": 1, "channels": 8, "side": 4}


def test_ratio_is_the_median_of_same_round_ratios_with_alternating_order():
    tool = _tool()
    log = []
    # Round ratios: 50/100, 90/100 (new first), 240/200 -> median 0.9; base median 100, new median 90.
    base = FakeWorker("base", log, [100, 100, 200])
    new = FakeWorker("new", log, [50, 90, 240])
    row = tool.measure_block("x", base, new, rounds=3, reps=1, max_first_s=10, shape=SHAPE)
    assert (row.ratio, row.ratio_min, row.ratio_max, row.rounds, row.status) == (0.9, 0.5, 1.2, 3, "ok")
    assert (row.base_ms, row.new_ms) == (100, 90)
    timed = [label for label, op in log if op == "time"]
    assert timed == ["base", "new", "new", "base", "base", "new"]


def test_skips_failures_and_a_worker_on_the_wrong_tree(tmp_path):
    tool = _tool()
    slow = tool.measure_block(
        "x",
        FakeWorker("b", [], [], first_s=30),
        FakeWorker("n", [], []),
        rounds=1,
        reps=1,
        max_first_s=20,
        shape=SHAPE,
    )
    assert slow.status == "skipped: first call 30.0 s" and math.isnan(slow.ratio)
    broken = tool.measure_block(
        "x",
        FakeWorker("b", [], []),
        FakeWorker("n", [], [], build_error="E: bad"),
        rounds=1,
        reps=1,
        max_first_s=20,
        shape=SHAPE,
    )
    assert broken.status == "failed: E: bad"
    absent = tool.measure_block(
        "x",
        FakeWorker("b", [], [], build_error="KeyError: x"),
        FakeWorker("n", [], []),
        rounds=1,
        reps=1,
        max_first_s=20,
        shape=SHAPE,
    )
    assert absent.status == "not at base: KeyError: x"
    elsewhere = FakeWorker("b", [], [1.0], tree=tmp_path)
    elsewhere.file_root = ROOT  # the checkout, not the tree this worker was started on
    with pytest.raises(RuntimeError, match="imported"):
        tool.measure_block(
            "x", elsewhere, FakeWorker("n", [], [1.0]), rounds=1, reps=1, max_first_s=20, shape=SHAPE
        )


def test_section_marks_slower_blocks_and_replaces_only_its_part():
    tool = _tool()
    R = tool.RegressionRow
    rows = [
        R("a", 10, 9, 0.9, 0.8, 1.0, 5),
        R("b", 10, 12, 1.2, 1.1, 1.3, 5),
        R("c", *[math.nan] * 5, 0, "skipped: x"),
    ]
    run = {"base": "abc", "machine": "m", "started": "t", "minutes": 1, "load_before": "1", "load_after": "2"}
    meta = {**SHAPE, "dtype": "float32", "runs": [{**run, "blocks": ["a", "b", "c"]}]}
    body = tool.section(meta, rows)
    assert (
        "| `a` | 0.90 | 0.80-1.00 |" in body
        and "| `b` | **1.20** |" in body
        and "| `c` | skipped: x |" in body
    )
    assert "2 blocks compared: 1 below 1.0, 1 above 1.05 (b)." in body
    page = "# T\n\nbefore\n"
    once = tool.replace_section(page, body)
    assert once.startswith(page.rstrip()) and tool.replace_section(once, "new") == page.rstrip() + "\n\n" + (
        f"{tool.BEGIN}\nnew\n{tool.END}\n"
    )
    with pytest.raises(ValueError, match="broken"):
        tool.replace_section(f"x {tool.END} y {tool.BEGIN}", "z")


def test_measure_saves_rows_and_merge_keeps_the_others(tmp_path, monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "extract", lambda rev, dest: dest)
    monkeypatch.setattr(
        tool, "Worker", lambda tree: FakeWorker("w", [], [10.0] * 10, tree=Path(tree).resolve())
    )
    out = tmp_path / "reg.json"
    args = ["measure", "--rounds", "2", "--reps", "1", "--json", str(out)]
    assert tool.main([*args, "--names", "gcnet"]) == 0
    assert tool.main([*args, "--names", "cbam", "--merge"]) == 0
    data = json.loads(out.read_text())
    assert [(r["name"], r["ratio"], r["status"]) for r in data["rows"]] == [
        ("cbam", 1.0, "ok"),
        ("gcnet", 1.0, "ok"),
    ]
    assert [r["blocks"] for r in data["meta"]["runs"]] == [["gcnet"], ["cbam"]]
    assert tool.main([*args, "--names", "nope"]) == 2
    assert "unknown block(s) ['nope']" in capsys.readouterr().err
    assert json.loads(out.read_text()) == data  # a refused run writes nothing


def test_one_real_run_against_head(tmp_path):
    """Two real worker processes, HEAD's archive and the checkout, each importing its own tree, time cbam."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout (an installed copy): the tool compares commits")
    out = tmp_path / "reg.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "cpu_regression.py"),
        "measure",
        "--base",
        "HEAD",
        "--rounds",
        "1",
    ]
    subprocess.run([*cmd, "--reps", "1", "--json", str(out), "--names", "cbam"], check=True, timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["name"] == "cbam" and row["status"] == "ok" and row["ratio"] > 0
