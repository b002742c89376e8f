"""Eager vs compiled measurement (visattn.bench.compiled): the ratio, the correctness check, failures recorded
row by row, the docs section and the `visattn bench --compiled` command. Fast backends (eager/aot_eager) and
an injected timer keep this deterministic; one tiny inductor run checks the real compiler."""

import json
import math

import pytest
import torch
import torch.nn as nn

from visattn import cli
from visattn.bench import compiled as cb


def _fake_timer(seen):
    """Compiled calls take 3 ms, eager ones 6 ms; records which function each call timed."""

    def timer(fn):
        seen.append(fn)
        return 3.0 if len(seen) % 4 in (1, 0) else 6.0

    return timer


class _CompileAware(nn.Module):
    """Adds ``offset`` to a gated branch only when compiled: a stand-in for a miscompiled block."""

    def __init__(self, gate: float = 1.0, offset: float = 1.0) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.tensor(gate))
        self.offset = offset

    def forward(self, x):
        branch = x * 2.0
        if torch.compiler.is_compiling():
            branch = branch + self.offset
        return x + self.gate * branch


class _Counter(nn.Module):
    """Training-mode state: a buffer that counts calls and shifts the output (added, not multiplied: a
    compiled backward that reads a buffer the forward mutates in place is a separate matter, which
    the row's gradient check reports as a mismatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        y = x * self.scale + self.calls
        self.calls.add_(1)
        return y


class _Breaks(nn.Module):
    def forward(self, x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


def test_row_times_interleaved_and_checks_compiled_against_eager():
    seen = []
    row = cb.measure_compiled(
        "cbam", channels=16, size=(4, 6), rounds=3, backend="aot_eager", timer=_fake_timer(seen)
    )
    assert (row.name, row.height, row.width, row.backend, row.compile_mode, row.status) == (
        "cbam",
        4,
        6,
        "aot_eager",
        "default",
        "ok",
    )
    # rounds alternate which side goes first: compiled, eager | eager, compiled | compiled, eager
    assert len(seen) == 6 and seen[0] is seen[3] is seen[4] and seen[1] is seen[2] is seen[5]
    assert seen[0] is not seen[1]
    assert (row.compiled_ms, row.eager_ms, row.ratio) == (3.0, 6.0, 0.5)
    assert row.graph_breaks == 0 and row.graphs == 1 and row.compile_s > 0 and row.saved_mib > 0
    assert row.max_out_err <= row.tolerance and row.max_grad_err <= row.tolerance
    assert row.tolerance >= 1e-4  # 1e-4 x max(1, max |eager|) in fp32


def test_mismatch_is_reported_with_both_errors_and_still_timed():
    row = cb.measure_compiled(
        "bad", module=_CompileAware(offset=0.5), channels=2, size=(2, 3), rounds=1, backend="eager",
        timer=lambda fn: 1.0,
    )  # fmt: skip
    # output: x + 1 * (2x + 0.5) vs x + 2x; input gradient: unchanged (the offset is a constant)
    assert row.max_out_err == pytest.approx(0.5)
    assert row.max_grad_err == 0.0
    assert row.status.startswith("mismatch: max error output 0.5 (tolerance")
    assert row.ratio == 1.0


def test_zero_initialised_gate_is_drawn_so_the_check_sees_the_branch():
    # With the gate at 0 (identity at init), eager and compiled outputs would both be x and agree.
    row = cb.measure_compiled(
        "gated", module=_CompileAware(gate=0.0), channels=2, size=(2, 2), rounds=1, backend="eager",
        timer=lambda fn: 1.0,
    )  # fmt: skip
    assert row.status.startswith("mismatch") and row.max_out_err > 0


def test_state_and_seed_are_reset_between_eager_and_compiled():
    row = cb.measure_compiled(
        "counter", module=_Counter(), channels=2, size=(3, 3), rounds=1, backend="aot_eager",
        timer=lambda fn: 1.0,
    )  # fmt: skip
    assert row.status == "ok" and row.max_out_err == 0.0 and row.max_grad_err == 0.0
    drop = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Dropout(0.5))
    row = cb.measure_compiled(
        "dropout", module=drop, channels=2, size=(4, 4), rounds=1, backend="aot_eager", timer=lambda fn: 1.0
    )
    assert row.status == "ok" and row.max_out_err == 0.0 and row.max_grad_err == 0.0


def test_graph_break_is_a_row_not_an_exception():
    row = cb.measure_compiled(
        "breaks", module=_Breaks(), channels=2, size=(2, 2), rounds=1, backend="eager", timer=lambda fn: 1.0
    )
    assert row.status.startswith("graph break: Unsupported") and row.graph_breaks == 1
    assert math.isnan(row.ratio) and math.isnan(row.compile_s)


def test_sweep_goes_on_after_a_failing_block_and_reports_each_row():
    got = []
    rows = cb.sweep_compiled(
        ["gcnet", "no_such_block", "cbam"], [(3, 5)], channels=8, rounds=1, backend="eager",
        timer=lambda fn: 2.0, on_row=got.append, progress=False,
    )  # fmt: skip
    assert [r.name for r in rows] == ["gcnet", "no_such_block", "cbam"] and got == rows
    assert [r.status for r in rows][::2] == ["ok", "ok"]
    bad = rows[1]
    assert bad.status.startswith("error: ValueError:") and "no_such_block" in bad.status
    assert bad.graph_breaks == -1 and math.isnan(bad.eager_ms)
    with pytest.raises(ValueError, match="bench --compiled: rounds must be >= 1, got 0"):
        cb.measure_compiled("cbam", rounds=0)


def _row(name, ratio, status="ok", graphs=1):
    return cb.CompiledRow(
        name, 1, 64, 64, 64, "float32", "cpu", "inductor", "default", 3, 10.0, 10.0 * ratio, ratio, 5.0, 0,
        graphs, 1e-6, 2e-6, 4e-4, 1.5, status,
    )  # fmt: skip


def test_markdown_summary_and_section_keep_the_rest_of_the_page(tmp_path):
    rows = [
        _row("cbam", 0.5),
        _row("axial", 1.25),
        _row("routing", 0.8, graphs=3),
        cb._error_row("performer", 1, 64, (64, 64), torch.float32, "cpu", "inductor", None, 3, KeyError("x")),
    ]
    table = cb.markdown_compiled(rows).splitlines()
    assert (
        table[0] == "| block | eager ms | compiled ms | compiled / eager | compile s | max error | status |"
    )
    assert table[2] == "| `axial` | 10 | 12.5 | **1.25** | 5 | 2e-06 | ok |"
    assert table[3] == "| `cbam` | 10 | 5 | 0.50 | 5 | 2e-06 | ok |"
    assert table[4].startswith("| `performer` | - | - | - | - | - | error: KeyError: 'x' |")
    assert table[5].endswith("| 0.80 | 5 | 2e-06 | ok (3 graphs: recompiled) |")
    long = _row("permutohedral", math.nan, status="graph break: UserError: " + "x " * 200)
    cells = [cb._status_cell(r, cb.REASONS) for r in (long, _row("slim", math.nan, status="graph break: U"))]
    assert cells[0].startswith("graph break: a `torch.Generator` created in forward")
    assert cells[1] == "graph break: U"  # slim compiles fullgraph in training now: no canned reason
    other = cb._status_cell(long, {})
    assert len(other) <= 160 and other.endswith("x ...") and other.startswith("graph break: UserError: x x")
    text = cb.summary(rows)
    assert text.startswith("2 of 3 timed blocks are faster compiled; median compiled / eager 0.80")
    assert "(best `cbam` 0.50, worst `axial` 1.25); not ok: `performer` (error)." in text
    meta = {"machine": "cpu x", "load_before": "1.0", "load_after": "2.0", "minutes": 3, "rounds": 3}
    body = cb.compiled_section(meta, rows, missing=["zz"])
    assert body.startswith("## Eager vs compiled (CPU)\n")
    assert "tools/gpu_sweep.py" in body and "unmeasured" in body
    assert body.endswith("Not measured (the run ended first): `zz`.")
    page = "# B\n\nintro\n\n## Peers\n\ntable\n"
    once = cb.replace_compiled_section(page, "first")
    assert once.startswith(page.rstrip()) and once.endswith(f"{cb.BEGIN}\nfirst\n{cb.END}\n")
    twice = cb.replace_compiled_section(once + "\ntail\n", "second")
    assert twice == page.rstrip() + f"\n\n{cb.BEGIN}\nsecond\n{cb.END}\n\ntail\n"
    with pytest.raises(ValueError, match="broken generated section"):
        cb.replace_compiled_section(page + cb.END + "\n" + cb.BEGIN, "x")
    # files: JSON round trip, CSV header, a bad file named in the error
    path = tmp_path / "c.json"
    cb.write_compiled_json(rows, path, meta=meta)
    meta2, back = cb.read_compiled_json(path)
    assert meta2["machine"] == "cpu x" and [r.name for r in back] == [r.name for r in rows]
    assert back[0] == rows[0] and math.isnan(back[3].ratio)
    cb.write_compiled_csv(rows, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text().splitlines()[0].startswith("name,batch,channels,height,width")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.json"]  # no temporary left behind
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json is not an eager-vs-compiled JSON file"):
        cb.read_compiled_json(tmp_path / "bad.json")


def test_cli_bench_compiled_writes_csv_and_json(tmp_path, capsys):
    argv = ["bench", "cbam", "gcnet", "--compiled", "--backend", "eager", "--sizes", "4", "--batch", "1"]
    argv += ["--channels", "8", "--rounds", "1", "--min-run-time", "0.001", "--no-progress"]
    argv += ["--csv", str(tmp_path / "c.csv"), "--json", str(tmp_path / "c.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("eager vs torch.compile(fullgraph=True)")
    assert "cbam " in out and "gcnet " in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["cbam", "gcnet"] and "machine" in data["meta"]
    assert {r["backend"] for r in data["rows"]} == {"eager"}
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("other", ["--vs-dense", "--peers"])
def test_cli_bench_compiled_refuses_other_runs_in_one_line(other, tmp_path, capsys):
    code = cli.main(["bench", "cbam", "--compiled", other, "--json", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--compiled and {other} are separate runs" in err
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow  # inductor's C++ code generation: about 25 s on one shared core
def test_inductor_on_a_tiny_block_matches_eager():
    torch.manual_seed(0)
    row = cb.measure_compiled(
        "cbam", channels=8, size=(4, 4), rounds=1, backend="inductor", timer=lambda fn: 1.0
    )
    assert row.status == "ok" and row.graphs == 1 and row.graph_breaks == 0
    assert row.max_out_err <= row.tolerance and row.max_grad_err <= row.tolerance and row.compile_s > 0


def test_merge_replaces_rows_of_the_remeasured_blocks_and_says_so(tmp_path):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    cb.write_compiled_json(
        [_row("axial", 1.25), _row("cbam", 0.5)], base, meta={"started": "then", "rounds": 3}
    )
    cb.write_compiled_json(
        [_row("cbam", 0.4), _row("zeta", 0.9)],
        new,
        meta={"started": "now", "load_before": 1.5, "load_after": 2},
    )
    cb.merge_compiled(base, new)
    meta, rows = cb.read_compiled_json(base)
    assert [(r.name, r.ratio) for r in rows] == [("axial", 1.25), ("cbam", 0.4), ("zeta", 0.9)]
    assert meta["started"] == "then"
    assert meta["remeasured"] == [
        {"started": "now", "load_before": 1.5, "load_after": 2, "names": ["cbam", "zeta"]}
    ]
    assert (
        "Re-measured after a change to the block, in a later run (now, load average 1.5 before and 2 after"
        in (cb.compiled_section(meta, rows))
    )
    other = tmp_path / "other.json"
    narrow = cb.CompiledRow(**{**_row("cbam", 0.4).__dict__, "channels": 32})
    cb.write_compiled_json([narrow], other, meta={})
    before = base.read_bytes()
    with pytest.raises(ValueError, match="different settings"):
        cb.merge_compiled(base, other)
    assert base.read_bytes() == before  # nothing written when the check fails


def test_doc_notes_are_kept_with_the_measurement(tmp_path):
    """A doc run's --note paragraphs are saved in the JSON, so the next doc run (a merge, say) repeats them
    instead of dropping them from the page."""
    data, page = tmp_path / "c.json", tmp_path / "page.md"
    cb.write_compiled_json([_row("cbam", 0.5)], data, meta={"machine": "m", "rounds": 3})
    page.write_text("# B\n")
    cb._doc_main([str(data), "--page", str(page), "--note", "Notes. Kept."])
    assert cb.read_compiled_json(data)[0]["notes"] == ["Notes. Kept."]
    cb._doc_main([str(data), "--page", str(page)])
    assert page.read_text().count("Notes. Kept.") == 1
