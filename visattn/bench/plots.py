"""Log-log scaling plots of a sweep (needs the `bench` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .runner import BenchRow, fit_exponents


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or one error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install 'visattn[bench]'") from err
    return plt


def plot_scaling(rows: list[BenchRow], out_dir: str | Path, *, title: str = "") -> list[Path]:
    """Time and saved memory versus N = H*W, one line per block, fitted exponent in the legend."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fits = fit_exponents(rows)
    written = []
    for metric, label in (
        ("fwd_bwd_ms", "forward+backward time (ms)"),
        ("saved_mib", "saved activations (MiB)"),
    ):
        fig, ax = plt.subplots(figsize=(9, 6.5))
        keys = sorted({(r.name, r.dtype) for r in rows if r.status == "ok"})
        cmap = plt.get_cmap("tab20")
        for i, key in enumerate(keys):
            rs = sorted(
                (r for r in rows if (r.name, r.dtype) == key and r.status == "ok"), key=lambda r: r.tokens
            )
            if len(rs) < 2:
                continue
            exp = fits.get(key, {}).get(metric)
            name = key[0] if len({k[1] for k in keys}) == 1 else f"{key[0]} ({key[1]})"
            ax.plot(
                [r.tokens for r in rs],
                [getattr(r, metric) for r in rs],
                marker="o",
                ms=3,
                lw=1,
                color=cmap(i % 20),
                ls="-" if i < 20 else "--",
                label=f"{name}: N^{exp:.2f}" if exp is not None else name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N = H·W")
        ax.set_ylabel(label)
        ax.set_title(title or label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=3, loc="upper left")
        fig.tight_layout()
        path = out_dir / f"scaling_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_vs_dense(
    rows, out_dir: str | Path, *, title: str = "", mode: str = "eager", filename: str = "vs_dense.png"
) -> Path:
    """Time ratio over dense (log scale) against the square side, one line per block, 1.0 marked;
    written to ``out_dir/filename``. ``rows`` are :class:`visattn.bench.vs_dense.DenseRatio`."""
    plt = _pyplot()
    from ..atomic import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.status == "ok" and r.mode == mode and r.height == r.width]
    keys = sorted({(r.name, r.dtype) for r in ok})
    fig, ax = plt.subplots(figsize=(12, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, key in enumerate(keys):
        rs = sorted((r for r in ok if (r.name, r.dtype) == key), key=lambda r: r.height)
        name = key[0] if len({k[1] for k in keys}) == 1 else f"{key[0]} ({key[1]})"
        ax.plot(
            [r.height for r in rs],
            [r.time_ratio for r in rs],
            marker="o",
            ms=3,
            lw=1,
            color=cmap(i % 20),
            ls=("-", "--", ":")[(i // 20) % 3],
            label=name,
        )
    ax.axhline(1.0, color="black", lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("square side S (map S x S)")
    ax.set_ylabel("forward+backward time / dense SDPA (same run)")
    ax.set_title(title or "versus dense multi-head SDPA (< 1: faster than dense)")
    ax.grid(True, which="both", alpha=0.3)
    # Outside the axes: with ~50 blocks an inner legend hides the lines near 1.0x, the ones that matter.
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out_dir / filename
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
