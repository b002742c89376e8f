"""The measuring code measures what it claims (known matmul FLOPs, known saved bytes, known power law)."""

import math

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
