"""PNG plots of a run (matplotlib's Agg canvas, no pyplot state): latency CDFs and a load timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from k2serve.extras import MissingExtraError
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.stats import in_flight_curve

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as e:  # a base install: plots are an optional extra
    raise MissingExtraError("matplotlib", "plot", "--plot-dir") from e


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path) -> Path:
    """CDFs of TTFT, TPOT and ITL (ms) of the successful requests, one panel each."""
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [x * 1e3 for r in ok if (x := r.ttft_s) is not None],
        "TPOT": [x * 1e3 for r in ok if (x := r.tpot_s) is not None],
        "ITL": [x * 1e3 for r in ok for x in r.itl_s],
    }
    fig = Figure(figsize=(13, 4))
    for ax, (name, values) in zip(fig.subplots(1, 3), series.items(), strict=True):
        if values:
            xs = np.sort(values)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
            for q in (50, 90, 99):
                ax.axvline(float(np.percentile(xs, q)), ls=":", lw=0.8, color="gray")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name} CDF (n={len(values)}; p50/p90/p99 dotted)")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_timeline(records: Sequence[RequestRecord], warmup_s: float, path: Path) -> Path:
    """Top: requests in flight and arrivals per second over the run. Bottom: TTFT and end-to-end
    latency of each request at its send time (failures marked)."""
    fig = Figure(figsize=(12, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    times, counts = in_flight_curve(records)
    top.step(times, counts, where="post", label="in flight")
    if records:
        end = max(r.finish_s or r.start_s for r in records)
        width = max(end / 40, 1e-3)  # about 40 bins over the run, s
        edges = np.arange(0.0, end + width, width)
        hist, _ = np.histogram([r.start_s for r in records], bins=edges)
        top.bar(
            edges[:-1],
            hist / width,
            width=width,
            align="edge",
            alpha=0.35,
            color="tab:orange",
            label=f"arrivals / s ({width:.3g} s bins)",
        )
    top.set_ylabel("requests")
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    ok = [r for r in records if r.ok]
    bottom.scatter([r.start_s for r in ok], [(r.e2e_s or 0) * 1e3 for r in ok], s=8, label="end-to-end")
    bottom.scatter(
        [r.start_s for r in ok if r.ttft_s is not None],
        [(r.ttft_s or 0) * 1e3 for r in ok if r.ttft_s is not None],
        s=8,
        label="TTFT",
    )
    bad = [r for r in records if not r.ok]
    if bad:
        bottom.scatter(
            [r.start_s for r in bad],
            [(r.e2e_s or 0) * 1e3 for r in bad],
            s=14,
            marker="x",
            color="red",
            label="failed / rejected",
        )
    bottom.set_xlabel("time since start (s)")
    bottom.set_ylabel("latency (ms)")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    for ax in (top, bottom):
        if warmup_s > 0:
            ax.axvspan(0, warmup_s, color="gray", alpha=0.12, label="_warm-up")
    top.set_title("load and latency over the run (grey: warm-up, excluded)")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(records: Sequence[RequestRecord], warmup_s: float, out_dir: str | Path) -> list[Path]:
    """Both plots into `out_dir` (created): latency_cdf.png and timeline.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(records, out / "latency_cdf.png"),
        plot_timeline(records, warmup_s, out / "timeline.png"),
    ]
