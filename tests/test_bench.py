"""The measuring code measures what it claims (known matmul FLOPs, known saved bytes, known power law)."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from visattn import cli
from visattn.bench import count_flops, growth_exponent, saved_activation_bytes
from visattn.bench.runner import BenchRow, fit_exponents


def test_flops_of_known_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert count_flops(torch.matmul, a, b) == 2 * 8 * 16 * 32


def test_flops_of_sdpa_on_cpu_are_counted():
    """FlopCounterMode alone counts CPU SDPA as 0 FLOPs; visattn adds the formula."""
    q = torch.randn(1, 2, 64, 16)
    assert count_flops(F.scaled_dot_product_attention, q, q, q) == 2 * (2 * 2 * 64 * 64 * 16)
    qg = q.clone().requires_grad_(True)
    fwd_bwd = count_flops(F.scaled_dot_product_attention, qg, qg, qg, backward=True)
    assert fwd_bwd == 2 * 2 * 64 * 64 * 16 * 2 * (1 + 2.5)


def test_saved_bytes_of_known_ops():
    x = torch.randn(64, 32, requires_grad=True)
    assert saved_activation_bytes(torch.sigmoid, x) == 64 * 32 * 4  # sigmoid saves its output
    lin = torch.nn.Linear(32, 8)
    assert (
        saved_activation_bytes(lin, x) == 64 * 32 * 4
    )  # input saved; the weight is a parameter, not counted
    assert saved_activation_bytes(lambda t: t.view(-1).view(64, 32).sigmoid(), x) == 64 * 32 * 4


def test_growth_exponent_recovers_power_law():
    n = [256, 1024, 4096, 16384]
    assert growth_exponent(n, [3.0 * v**1.5 for v in n]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        growth_exponent([1], [1])


def test_fit_exponents_per_block():
    rows = [
        BenchRow(
            "a", 1, 8, s, s, "float32", "cpu", 1, s**2 * 1.0, float(s**4), float(s**2), float(s**2), None, 0.1
        )
        for s in (8, 16, 32)
    ]
    fit = fit_exponents(rows)[("a", "float32")]
    assert fit["fwd_bwd_ms"] == pytest.approx(2.0) and fit["fwd_gflops"] == pytest.approx(1.0)


def test_bench_cli_smoke_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = cli.main(
        [
            "bench",
            "cbam",
            "gcnet",
            "--sizes",
            "8,16",
            "--batch",
            "1",
            "--channels",
            "16",
            "--min-run-time",
            "0.01",
            "--csv",
            str(tmp_path / "b.csv"),
            "--plot",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "cbam" in out and "gcnet" in out and "fitted exponents" in out
    lines = (tmp_path / "b.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("name,")
    png = tmp_path / "scaling_fwd_bwd_ms.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(float(lines[1].split(",")[9]))


def test_peer_comparison_reports_ratio_and_missing_peers(monkeypatch):
    from visattn.bench import peers

    rows = peers.compare(["cbam"], batch=1, channels=16, size=(8, 8), min_run_time=0.01)
    ((ours, peer, label),) = rows
    assert peer is not None and "CbamModule" in label and peer.params > 0 and peer.fwd_bwd_ms > 0
    missing = peers.PeerSpec("ghost", "no_such_package_xyz", lambda c, hw: None)
    monkeypatch.setitem(peers.PEERS, "cbam", [missing])
    ((_, peer, label),) = peers.compare(["cbam"], batch=1, channels=16, size=(8, 8), min_run_time=0.01)
    assert peer is None and "not installed" in label
    assert "not installed" in peers.format_ratios([(ours, None, label)])


# --- versus dense (issue 16): structure and arithmetic, never timing values -------------------------------


def _load_tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ratio_row(name, side, ratio, status="ok", mode="eager"):
    from visattn.bench.vs_dense import DenseRatio

    return DenseRatio(
        name, 1, 16, side, side, "float32", "cpu", mode, 1, 3, 2.0 * ratio, 2.0, ratio, 1.0, 4.0, 0.25, status
    )


def test_interleaved_ratio_is_median_of_per_round_ratios_and_alternates_order():
    from visattn.bench.vs_dense import interleaved_ratio

    calls, block, dense = [], iter([2.0, 4.0, 6.0]), iter([1.0, 1.0, 2.0])

    def tb():
        calls.append("b")
        return next(block)

    def td():
        calls.append("d")
        return next(dense)

    # per-round ratios 2, 4, 3 -> median 3; the ratio of medians would be 4 / 1 = 4
    assert interleaved_ratio(tb, td, 3) == (4.0, 1.0, 3.0)
    assert calls == ["b", "d", "d", "b", "b", "d"]
    with pytest.raises(ValueError, match="rounds"):
        interleaved_ratio(tb, td, 0)


def test_find_crossover_on_a_fake_timing_function():
    from visattn.bench.vs_dense import find_crossover

    asked = []

    def ratio(side):  # a block that wins from 48 on: ratio falls as 48 / side
        asked.append(side)
        return 48 / side + 0.01 if side < 48 else 48 / side - 0.01

    assert find_crossover(ratio, [96, 32, 64, 48, 16]) == 48
    assert asked == [96, 64, 48, 32]  # from the largest down, stopping at the first loss
    assert find_crossover(lambda s: 1.0, [16, 32]) is None  # equal to dense is not faster
    assert find_crossover(lambda s: 0.5, [16, 32]) == 16
    # faster at small and large sides but not in between: the crossover is where it stays faster
    assert find_crossover({16: 0.9, 32: 1.2, 64: 0.8}.__getitem__, [16, 32, 64]) == 64
    assert find_crossover({16: 0.5, 32: math.nan}.__getitem__, [16, 32]) is None
    with pytest.raises(ValueError, match="grid"):
        find_crossover(lambda s: 0.5, [])


def test_crossovers_per_block_and_failed_rows_count_as_losing():
    from visattn.bench.vs_dense import crossovers

    rows = [_ratio_row("a", s, r) for s, r in ((16, 1.5), (32, 0.9), (64, 0.4))]
    rows += [_ratio_row("b", 16, 0.5), _ratio_row("b", 32, math.nan, status="error: OOM")]
    rows += [_ratio_row("a", 16, 0.1, mode="compiled")]
    assert crossovers(rows) == {
        ("a", "float32", "eager"): 32,
        ("b", "float32", "eager"): None,
        ("a", "float32", "compiled"): 16,
    }


def test_dense_reference_is_multihead_sdpa_over_all_tokens():
    from visattn.bench.vs_dense import DenseAttention, block_heads

    torch.manual_seed(0)
    dense = DenseAttention(16, heads=4)
    x = torch.randn(2, 16, 3, 5)
    t = x.flatten(2).transpose(1, 2)  # (B, N, C) raster order
    a = dense.attn
    k, v = a.kv(t).chunk(2, dim=-1)
    q = a.q(t)
    split = lambda z: z.reshape(2, 15, 4, 4).transpose(1, 2)  # noqa: E731
    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 2.0, dim=-1)
    ref = a.proj((p @ split(v)).transpose(1, 2).reshape(2, 15, 16))
    expected = x + ref.transpose(1, 2).reshape(2, 16, 3, 5)
    torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-5)
    assert block_heads(torch.nn.Module(), 64) == 2  # no heads attribute: the library default (C // 32)
    m = torch.nn.Module()
    m.heads = 8
    assert block_heads(m, 64) == 8
    with pytest.raises(ValueError, match="dense: heads"):
        DenseAttention(16, heads=3)


def test_measure_vs_dense_row_with_fake_timer_and_skip():
    from visattn.bench.vs_dense import measure_vs_dense, sweep_vs_dense

    seen = []

    def fake(fn):
        seen.append(fn)
        return 6.0 if fn is seen[0] else 2.0

    row = measure_vs_dense("isab", channels=16, size=(4, 6), rounds=3, timer=fake)
    assert (row.name, row.height, row.width, row.heads, row.mode, row.status) == (
        "isab",
        4,
        6,
        4,
        "eager",
        "ok",
    )
    assert (row.block_ms, row.dense_ms, row.time_ratio) == (6.0, 2.0, 3.0)
    assert len(seen) == 6 and row.block_saved_mib > 0 and row.dense_saved_mib > 0
    assert row.memory_ratio == pytest.approx(row.block_saved_mib / row.dense_saved_mib)
    skipped = measure_vs_dense("cbam", channels=16, size=(4, 4), max_call_s=0.0, timer=fake)
    assert skipped.status.startswith("skipped: one block forward+backward took") and math.isnan(
        skipped.time_ratio
    )
    # a larger size is predicted from the smaller one (scaled as N^e) and never run
    small, large = sweep_vs_dense(["gcnet"], [(4, 4), (64, 64)], channels=16, max_call_s=1e-9, progress=False)
    assert small.status.startswith("skipped: one block") and small.first_call_s > 0
    assert large.status.startswith("skipped: one block forward+backward predicted at")
    assert math.isnan(large.first_call_s)


def test_markdown_and_section_replacement_keep_the_rest_of_the_page():
    from visattn.bench.vs_dense import BEGIN, END, markdown_vs_dense, replace_section

    rows = [_ratio_row("cbam", 16, 1.25), _ratio_row("cbam", 32, 0.5), _ratio_row("nonlocal", 16, 0.5)]
    rows.append(_ratio_row("nonlocal", 32, 1.5))
    table = markdown_vs_dense(rows, reasons={"nonlocal": "O(N^2) too", "cbam": "never shown: it wins"})
    lines = table.splitlines()
    assert lines[0].startswith("| block | FLOP exp. | heads | time x at 16x16 | time x at 32x32 |")
    assert lines[2] == "| `cbam` | 1 | 1 | **1.25** | 0.50 | 0.25 | 32 |  |"
    assert lines[3] == "| `nonlocal` | 2 | 1 | 0.50 | **1.50** | 0.25 | none | O(N^2) too |"
    page = "# Title\n\nhand-written text\n"
    once = replace_section(page, "## A\nfirst")
    assert once.startswith(page.rstrip()) and f"{BEGIN}\n## A\nfirst\n{END}" in once
    twice = replace_section(once + "\ntrailing text\n", "## A\nsecond")
    assert "first" not in twice and "second" in twice and twice.endswith("trailing text\n")
    assert twice.count(BEGIN) == 1
    with pytest.raises(ValueError, match="broken generated section"):
        replace_section(page + BEGIN + "\n", "x")


def test_bench_cli_vs_dense_writes_json_and_refuses_peers(tmp_path, capsys):
    from visattn.bench.vs_dense import read_vs_dense_json

    argv = ["bench", "gcnet", "--sizes", "4,8", "--batch", "1", "--channels", "16", "--min-run-time", "0.001"]
    code = cli.main(
        argv + ["--vs-dense", "--rounds", "1", "--json", str(tmp_path / "v.json"), "--no-progress"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "versus dense" in out and "crossover" in out and "gcnet" in out
    meta, rows = read_vs_dense_json(tmp_path / "v.json")
    assert "cores" in meta["machine"] and [(r.name, r.height, r.status) for r in rows] == [
        ("gcnet", 4, "ok"),
        ("gcnet", 8, "ok"),
    ]
    assert cli.main(argv + ["--vs-dense", "--peers"]) == 2
    assert "--vs-dense and --peers are separate runs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a vs-dense JSON"):
        read_vs_dense_json(tmp_path / "missing.json")


def test_gpu_sweep_smoke_on_cpu_and_docs_section(tmp_path, monkeypatch, capsys):
    from visattn.bench import vs_dense

    sweep = _load_tool("gpu_sweep")
    counted = []
    real_count = vs_dense.forward_backward_flops

    def spy(model, x):
        counted.append((type(model).__name__, tuple(x.shape), x.dtype))
        return real_count(model, x)

    monkeypatch.setattr(vs_dense, "forward_backward_flops", spy)
    assert sweep.main([str(tmp_path / "run"), "--smoke"]) == 0
    printed = capsys.readouterr().out
    assert "plan (estimated by a rough cost model; --budget 540 s):" in printed
    assert "chunks:float32" in printed and "estimated: ~" in printed
    results = json.loads((tmp_path / "run" / "sweep.json").read_text())
    meta = results["meta"]
    assert meta["smoke"] is True and "cores" in meta["device"] and meta["stopped"] is None
    assert meta["engines"] == {"pattern": [], "scan": []} and meta["goal_sides"] == [8, 16]
    assert [s["stage"] for s in meta["stage_seconds"]] == [
        "chunks:float32", "eager:bfloat16:8", "eager:bfloat16:16", "eager:float32:8", "compiled:float32:8",
        "peers:float32:8",
    ]  # fmt: skip
    got = {(r["name"], r["dtype"], r["mode"], r["height"]) for r in results["vs_dense"]}
    want = {
        (n, dt, mode, side)
        for n in ("cbam", "gcnet")
        for dt, mode, side in (
            ("bfloat16", "eager", 8),
            ("bfloat16", "eager", 16),
            ("float32", "eager", 8),
            ("float32", "compiled", 8),
        )
    }
    assert got == want and all(r["status"] == "ok" for r in results["vs_dense"])
    # FLOPs: counted once per (block, size, dtype), block and dense, never for the compiled repeat
    assert len(counted) == 2 * 3 * 2
    assert [c[0] for c in counted].count("DenseAttention") == 6
    by = {(r["name"], r["dtype"], r["mode"], r["height"]): r for r in results["vs_dense"]}
    for r in results["vs_dense"]:
        assert r["block_flops"] > 0 and r["dense_flops"] > r["block_flops"] and r["flops_note"] == ""
        rate = meta["matmul_tflops_bf16" if r["dtype"] == "bfloat16" else "matmul_tflops_fp32"]
        assert r["matmul_tflops"] == rate
        assert r["block_tflops"] == pytest.approx(r["block_flops"] / (r["block_ms"] * 1e-3) / 1e12)
        assert r["dense_matmul_fraction"] == pytest.approx(r["dense_tflops"] / rate)
        assert r["block_matmul_fraction"] == pytest.approx(r["block_tflops"] / rate)
    for n in ("cbam", "gcnet"):
        eager, compiled = by[n, "float32", "eager", 8], by[n, "float32", "compiled", 8]
        assert (compiled["block_flops"], compiled["dense_flops"]) == (
            eager["block_flops"],
            eager["dense_flops"],
        )
        # the dense reference's work grows 4x in its linear parts and 16x in attention from 8x8 to 16x16
        assert (
            4
            < by[n, "bfloat16", "eager", 16]["dense_flops"] / by[n, "bfloat16", "eager", 8]["dense_flops"]
            < 16
        )
    # the chunk sizes of both scans: the smoke sizes plus each kind's default, exactly one default per kind
    chunks = results["chunks"]
    assert {r["kind"] for r in chunks} == {"linear", "delta"} and {8, 16} <= {r["chunk_size"] for r in chunks}
    assert all(r["tokens"] == 256 and r["fwd_bwd_ms"] > 0 and r["flops"] > 0 for r in chunks)
    assert sorted(r["kind"] for r in chunks if r["is_default"]) == ["delta", "linear"]
    assert [p["name"] for p in results["peers"]] == ["cbam", "gcnet"] and results["agreement"] == []
    # a later session adds its stages' rows to the same file; a (block, size, dtype) counted before is reused
    before = len(counted)
    more = ["--smoke", "--names", "gcnet", "--stages", "eager:float32:4", "eager:bfloat16:8"]
    assert sweep.main([str(tmp_path / "run"), *more]) == 0
    again = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert len(again["vs_dense"]) == len(results["vs_dense"]) + 2 and len(again["meta"]["continued"]) == 1
    assert again["vs_dense"][-2]["height"] == 4 and len(counted) == before + 2
    assert again["vs_dense"][-1]["block_flops"] == by["gcnet", "bfloat16", "eager", 8]["block_flops"]
    page = tmp_path / "gpu.md"
    page.write_text("# GPU benchmarks\n\nearlier figures stay\n")
    assert sweep.main(["--docs", "--page", str(page)]) == 0
    assert "**Not measured yet.**" in page.read_text()
    assert sweep.main(["--docs", str(tmp_path / "run"), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# GPU benchmarks\n\nearlier figures stay\n") and "Not measured yet" not in text
    assert "SMOKE RUN on CPU" in text and "### float32, compiled" in text and "### Peers" in text
    assert "Continued in session(s) started" in text
    assert "### Issue 16's goals (8/16: bf16 eager rows)" in text
    assert "| `pkm` runs in bfloat16 | **not measured** | no row |" in text
    assert (
        "| pattern-engine blocks >= 25% of the matmul rate at 8 and 16 | **not measured** | no such block"
        in text
    )
    assert "### Chunk size of the linear scans" in text and "| linear | float32 | 256 x 2 x 8 |" in text
    assert "| block | engine | FLOP exp. | time x dense at 8x8 | matmul fraction at 8 (dense) |" in text
    assert "Seconds per stage (estimate in brackets): chunks:float32" in text
    assert "![versus dense, GPU bf16 eager](img/vs_dense_gpu.png)" in text
    assert (tmp_path / "img" / "vs_dense_gpu.png").read_bytes().startswith(b"\x89PNG")


def _goal_row(
    name, side, ratio, fraction=math.nan, block_ms=1.0, status="ok", mode="eager", dtype="bfloat16"
):
    from visattn.bench.vs_dense import DenseRatio

    return DenseRatio(
        name, 2, 256, side, side, dtype, "cuda", mode, 8, 3, block_ms, block_ms / ratio, ratio, 1.0, 1.0, 1.0,
        status, block_matmul_fraction=fraction,
    )  # fmt: skip


def test_gpu_sweep_goal_checks_decide_each_goal_from_the_rows():
    sweep = _load_tool("gpu_sweep")
    engines = {"pattern": ["longformer", "bigbird"], "scan": ["performer"]}
    rows = [
        _goal_row("longformer", 128, 0.8, fraction=0.30),
        _goal_row("longformer", 256, 0.3, fraction=0.40),
        _goal_row("bigbird", 128, 1.0, fraction=0.25),  # on the limits: met
        _goal_row("bigbird", 256, 0.33, fraction=0.26),
        _goal_row("performer", 128, 1.2, fraction=0.10),
        _goal_row("performer", 256, 0.2),  # timed, but no FLOPs: the fraction goal cannot count it
        _goal_row("performer", 128, 0.5, fraction=0.9, mode="compiled"),  # compiled rows do not count
        _goal_row("performer", 128, 0.5, fraction=0.9, dtype="float32"),  # nor other dtypes
        _goal_row("danet", 128, 3.0),  # declared O(N^2): no ratio goal
        _goal_row("cbam", 128, math.nan, status="skipped: one block forward+backward took 3.0 s > 2 s"),
        _goal_row("cbam", 256, 0.1),
        _goal_row("compressive", 64, 0.5, block_ms=12.0),
        _goal_row("memformer", 64, 0.5, block_ms=8.0),
        _goal_row("pkm", 128, math.nan, status="error: RuntimeError: no bf16 kernel"),
    ]
    checks = sweep.goal_checks(rows, engines)
    assert [(c["goal"], c["verdict"]) for c in checks] == [
        ("FLOP exponent <= 1.5: <= 1.00x dense at 128x128", "not met"),
        ("FLOP exponent <= 1.5: <= 0.33x dense at 256x256", "open"),
        ("pattern-engine blocks >= 25% of the matmul rate at 128 and 256", "met"),
        ("linear-scan blocks >= 25% of the matmul rate at 128 and 256", "not met"),
        ("compressive and memformer <= 10 ms at 64x64", "not met"),
        ("`pkm` runs in bfloat16", "not met"),
    ]
    details = [c["detail"] for c in checks]
    assert details[0] == (
        "3 measured; 1 above 1.00x: `performer` 1.20x; not measured: `cbam` (skipped), `compressive` (no row), "
        "`memformer` (no row), `pkm` (error)"
    )
    assert details[1] == (
        "4 measured; not measured: `compressive` (no row), `memformer` (no row), `pkm` (no row)"
    )
    assert details[2] == "4 measured"
    assert (
        details[3]
        == "1 measured; 1 below 25%: `performer` at 128 10 %; not measured: `performer` at 256 (no FLOPs)"
    )
    assert details[4] == "2 measured; 1 above 10 ms: `compressive` 12.0 ms"
    assert details[5] == "error: RuntimeError: no bf16 kernel"
    # every goal met; pkm ran; nothing measured at all
    good = [r for r in rows if r.name in ("longformer", "bigbird", "memformer")]
    good.append(_goal_row("pkm", 64, 0.9))
    checks = sweep.goal_checks(good, {"pattern": ["longformer", "bigbird"], "scan": []}, sides=(128, 256))
    assert [c["verdict"] for c in checks] == ["open", "open", "met", "not measured", "open", "met"]
    assert (
        checks[5]["detail"] == "ran at 64x64 eager" and checks[3]["detail"] == "no such block in this sweep"
    )
    assert [c["verdict"] for c in sweep.goal_checks([], engines)] == ["not measured"] * 6
    table = sweep.markdown_goals(checks[-1:]).splitlines()
    assert table == [
        "| goal | verdict | detail |",
        "|---|---|---|",
        "| `pkm` runs in bfloat16 | **met** | ran at 64x64 eager |",
    ]


def test_gpu_sweep_plan_estimate_stages_and_chunk_table():
    import argparse

    sweep = _load_tool("gpu_sweep")
    cfg = sweep.plan(smoke=False)
    assert cfg["stages"][:4] == [
        ("chunks", "bfloat16", 0), ("eager", "bfloat16", 128), ("eager", "bfloat16", 256), ("eager", "bfloat16", 64)
    ]  # fmt: skip
    names = ["a", "b", "c", "d"]
    est = sweep.estimate(cfg, names, {"a"})
    assert est[0] == ("start", cfg["cost"]["start_s"]) and est[1] == (
        "chunks:bfloat16",
        cfg["cost"]["chunks_s"],
    )
    by = dict(est)
    assert by["peers:float32:64"] == cfg["cost"]["peer_s"]  # one block of four has a peer
    assert by["compiled:bfloat16:128"] == pytest.approx(
        by["eager:bfloat16:128"] + 4 * cfg["cost"]["compile_s"]
    )
    assert by["eager:bfloat16:256"] > by["eager:bfloat16:128"] > by["eager:bfloat16:64"]
    assert by["eager:float32:128"] > by["eager:bfloat16:128"]
    text = sweep.format_plan([("start", 10.0), ("x", 20.0), ("y", 40.0), ("z", 5.0)], budget=50)
    assert text.splitlines()[2:] == [
        "  x                        ~     20 s   total ~    30 s",
        "  y                        ~     40 s   total ~    70 s  cut by the budget after ~50% of it",
        "  z                        ~      5 s   total ~    75 s  past the budget: not run",
        "estimated: ~50 s of 75 s for the whole plan",
    ]
    assert sweep.parse_stage("chunks:bfloat16") == ("chunks", "bfloat16", 0)
    assert sweep.parse_stage("eager:float32:64") == ("eager", "float32", 64)
    with pytest.raises(argparse.ArgumentTypeError, match="KIND eager|compiled|peers|agreement|chunks"):
        sweep.parse_stage("chunk:bfloat16")

    def chunk(kind, size, ms, default=False):
        return {"kind": kind, "chunk_size": size, "tokens": 64, "batch_heads": 2, "head_dim": 4,
                "dtype": "bfloat16", "device": "cuda", "fwd_bwd_ms": ms, "flops": 1e9, "tflops": 1e-3 / ms,
                "is_default": default}  # fmt: skip

    table = sweep.markdown_chunks(
        [chunk("linear", 16, 2.0), chunk("linear", 64, 3.0, True), chunk("delta", 16, 4.0, True)]
    ).splitlines()
    assert table[2:] == [
        "| linear | bfloat16 | 64 x 2 x 4 | 64 | 16 | 1.50 | 0.0005 | 16: 2, 64: 3 |",
        "| delta | bfloat16 | 64 x 2 x 4 | 16 | 16 | 1.00 | 0.00025 | 16: 4 |",
    ]


def test_gpu_sweep_budget_stop_and_failed_chunk_sweep_leave_a_valid_file(tmp_path, monkeypatch):
    from visattn.bench import chunks

    sweep = _load_tool("gpu_sweep")
    argv = ["--smoke", "--names", "gcnet", "--stages", "chunks:float32", "eager:float32:4"]
    assert sweep.main([str(tmp_path / "a"), *argv, "--budget", "0"]) == 0
    stopped = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert stopped["meta"]["stopped"] == "budget of 0 s reached before chunks:float32"
    assert stopped["vs_dense"] == [] and stopped["chunks"] == []

    def broken(**kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(chunks, "sweep_chunk_sizes", broken)
    assert sweep.main([str(tmp_path / "b"), *argv]) == 0
    done = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert done["meta"]["chunks_error"] == "RuntimeError: no kernel" and done["meta"]["stopped"] is None
    assert [r["status"] for r in done["vs_dense"]] == ["ok"]  # the stage after it still ran
    assert "The chunk sweep failed: RuntimeError: no kernel" in sweep.docs_section(tmp_path / "b")


def test_gpu_sweep_engine_blocks_are_read_from_the_code():
    sweep = _load_tool("gpu_sweep")
    got = sweep.engine_blocks(["bigbird", "cbam", "dpfp", "efficient_attention", "longformer", "performer"])
    # bigbird calls the engine's function without its PatternAttention module; dpfp's scan is the delta rule
    assert got == {"pattern": ["bigbird", "longformer"], "scan": ["dpfp", "performer"]}


def test_vs_dense_flops_fields_counted_reused_or_explained(monkeypatch):
    import visattn
    from visattn.bench import vs_dense
    from visattn.layers import sparse_pattern

    times = iter([6.0, 2.0, 2.0, 6.0, 6.0, 2.0])
    row = vs_dense.measure_vs_dense(
        "gcnet",
        channels=16,
        size=(4, 6),
        rounds=3,
        timer=lambda fn: next(times),
        count_flops=True,
        matmul_tflops=2.0,
    )
    assert (row.block_ms, row.dense_ms) == (6.0, 2.0) and row.block_flops > 0 and row.dense_flops > 0
    assert row.block_tflops == pytest.approx(row.block_flops / 6e-3 / 1e12)
    assert row.dense_tflops == pytest.approx(row.dense_flops / 2e-3 / 1e12)
    assert row.block_matmul_fraction == pytest.approx(row.block_tflops / 2.0) and row.matmul_tflops == 2.0
    # off by default: nothing counted, nothing invented
    plain = vs_dense.measure_vs_dense("gcnet", channels=16, size=(4, 6), rounds=1, timer=lambda fn: 1.0)
    assert (
        math.isnan(plain.block_flops) and math.isnan(plain.block_matmul_fraction) and plain.flops_note == ""
    )

    def boom(model, x):
        raise RuntimeError("no formula")

    monkeypatch.setattr(vs_dense, "forward_backward_flops", boom)
    known = vs_dense.measure_vs_dense(
        "gcnet",
        channels=16,
        size=(4, 6),
        rounds=1,
        timer=lambda fn: 2.0,
        known_flops=(4e9, 8e9),
        matmul_tflops=1.0,
    )
    assert (known.block_flops, known.dense_flops, known.block_tflops, known.dense_matmul_fraction) == (
        4e9, 8e9, 2.0, 4.0
    )  # fmt: skip
    failed = vs_dense.measure_vs_dense(
        "gcnet", channels=16, size=(4, 6), rounds=1, timer=lambda fn: 2.0, count_flops=True
    )
    assert failed.status == "ok" and failed.time_ratio == 1.0 and math.isnan(failed.block_flops)
    assert failed.flops_note == "RuntimeError: no formula"
    monkeypatch.undo()
    # a pattern block is counted on the engine's reference path whatever the setting: 'flex' has no CPU
    # backward (it raises), so this count only works because the reference path is forced
    block = visattn.create_attn("longformer", 16)
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    reference = vs_dense.forward_backward_flops(block, x)
    with sparse_pattern.backend("flex"):
        assert vs_dense.forward_backward_flops(block, x) == reference > 0
        assert sparse_pattern.get_backend() == "flex"


def test_vs_dense_rows_and_sweeps_written_before_the_flops_fields_still_load(tmp_path):
    from visattn.bench.vs_dense import read_vs_dense_json

    sweep = _load_tool("gpu_sweep")
    old = {
        "name": "cbam", "batch": 2, "channels": 256, "height": 128, "width": 128, "dtype": "bfloat16",
        "device": "cuda", "mode": "eager", "heads": 8, "rounds": 3, "block_ms": 1.0, "dense_ms": 2.0,
        "time_ratio": 0.5, "block_saved_mib": 1.0, "dense_saved_mib": 2.0, "memory_ratio": 0.5, "status": "ok",
        "first_call_s": 0.1,
    }  # fmt: skip
    (tmp_path / "v.json").write_text(json.dumps({"meta": {}, "rows": [old]}))
    (row,) = read_vs_dense_json(tmp_path / "v.json")[1]
    assert row.time_ratio == 0.5 and math.isnan(row.block_flops) and row.flops_note == ""
    meta = {
        "device": "NVIDIA H200 (torch 2.11)", "batch": 2, "channels": 256, "rounds": 3, "started": "then",
        "matmul_tflops_fp32": 51.0, "matmul_tflops_bf16": 684.0, "stopped": None,
    }  # fmt: skip
    (tmp_path / "sweep.json").write_text(
        json.dumps({"meta": meta, "vs_dense": [old], "peers": [], "agreement": []})
    )
    text = sweep.docs_section(tmp_path)
    assert "NVIDIA H200" in text and "### Issue 16's goals (128/256: bf16 eager rows)" in text
    assert "| `cbam` |  | 1 | 0.50 | - (-) | - | - |" in text and "Chunk size" not in text


def test_benchmarks_doc_vs_dense_section_from_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from visattn.bench.vs_dense import write_vs_dense_json

    doc = _load_tool("benchmarks_doc")
    rows = [_ratio_row("cbam", 32, 0.5), _ratio_row("cbam", 64, 0.25), _ratio_row("danet", 64, 2.0)]
    meta = {"machine": "test cpu", "load_before": "1.0", "load_after": "2.0", "rounds": 3, "max_call_s": 2.5}
    write_vs_dense_json(rows, tmp_path / "v.json", meta={**meta, "started": "now", "minutes": 1})
    page = tmp_path / "b.md"
    page.write_text("# Benchmarks\n\nkept\n")
    monkeypatch.setitem(doc.REASONS, "danet", "dense position and channel attention, O(N^2)")
    argv = [
        "x",
        "vs-dense-doc",
        str(tmp_path / "v.json"),
        "--page",
        str(page),
        "--img",
        str(tmp_path / "img"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    doc.main()
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "test cpu" in text
    assert (
        "| `danet` | 2 | 1 | - | **2.00** | 0.25 | none | dense position and channel attention, O(N^2) |"
        in text
    )
    assert "1 of 2 measured blocks are faster than dense; at or above 1.0x: `danet`." in text
    assert (tmp_path / "img" / "vs_dense.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmarks_doc_vs_dense_merge_replaces_a_blocks_rows_and_names_them(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from visattn.bench.vs_dense import read_vs_dense_json, write_vs_dense_json

    doc = _load_tool("benchmarks_doc")
    settings = {"batch": 1, "channels": 64, "dtype": "float32", "rounds": 3, "max_call_s": 3.0}
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    write_vs_dense_json(
        [_ratio_row("cbam", 32, 0.5), _ratio_row("danet", 32, 2.0)],
        base,
        meta={**settings, "machine": "cpu", "started": "then", "load_before": 1.0, "load_after": 1.0},
    )
    write_vs_dense_json(
        [_ratio_row("danet", 32, 1.5), _ratio_row("danet", 64, 1.8)],
        new,
        meta={**settings, "started": "later", "load_before": 2.5, "load_after": 2.0, "max_call_s": 15.0},
    )
    monkeypatch.setattr(sys, "argv", ["x", "vs-dense-merge", str(base), str(new)])
    doc.main()
    meta, rows = read_vs_dense_json(base)
    assert [(r.name, r.height, r.time_ratio) for r in rows] == [
        ("cbam", 32, 0.5), ("danet", 32, 1.5), ("danet", 64, 1.8)
    ]  # fmt: skip
    assert meta["started"] == "then" and meta["remeasured"][0]["names"] == ["danet"]
    page = tmp_path / "b.md"
    page.write_text("# Benchmarks\n")
    argv = ["x", "vs-dense-doc", str(base), "--page", str(page), "--img", str(tmp_path / "img")]
    monkeypatch.setattr(sys, "argv", argv)
    doc.main()
    assert (
        "Re-measured in a later run (later, load average 2.5 before and 2.0 after, rows skipped above 15"
        in (page.read_text())
    )


def test_saved_activation_bytes_frees_the_graph_it_measured():
    """A node that saves its own output (exp) must not keep it alive after the measurement: packing the
    tensor itself made an uncollectable cycle, and every memory pass leaked its activations."""
    import gc
    import weakref

    from visattn.bench import saved_activation_bytes

    kept = []

    class SavesOutput(torch.nn.Module):
        def forward(self, x):
            y = torch.exp(x * 2)
            kept.append(weakref.ref(y))
            return y.sum()

    x = torch.randn(64, 64, requires_grad=True)
    assert saved_activation_bytes(SavesOutput(), x) >= 64 * 64 * 4
    gc.collect()
    assert kept[0]() is None


def test_device_session_script_is_valid_and_runs_what_exists():
    """tools/device_session.sh is what a short device session runs: it must parse, and the test files it names
    must exist and hold `gpu`-marked tests (a rename would otherwise waste the session's minutes)."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "tools" / "device_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    named = re.findall(r"tests/\w+\.py", script.read_text())
    assert named, "the script names no test files"
    for path in named:
        assert "pytest.mark.gpu" in (root / path).read_text(), f"{path} has no gpu-marked test"


def test_interleaved_times_alternate_the_order_of_every_function():
    from visattn.bench.runner import interleaved_times

    calls = []
    fns = [lambda k=k: calls.append(k) or float(len(calls)) for k in "abc"]
    times = interleaved_times(fns, 3)
    assert "".join(calls) == "abccbaabc"
    assert times == [[1.0, 6.0, 7.0], [2.0, 5.0, 8.0], [3.0, 4.0, 9.0]]
