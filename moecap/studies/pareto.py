"""The throughput / perplexity frontier of expert placements (``moecap engine pareto``).

Configurations are a grid of (share of experts quantized, their precision, share placed in host memory),
optionally under a fast-memory budget, plus mixtures of precisions (every expert its own precision and
tier under a budget, by activation frequency x quantization sensitivity). Each becomes an ``engine`` runner of one generated suite, run by
the ordinary executor: one validated record per configuration, with decode throughput, perplexity on
the chosen data set, S-MBU, and the bytes per tier. The frontier is the set of configurations that no
other beats on both throughput (higher) and perplexity (lower); along it, sorted by throughput,
perplexity is monotone by construction. Configurations that are best on neither axis but hold less in
fast memory are marked as well (the three-way frontier), since saving memory is the point of offloading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from moecap import figures

FRONTIER_FILE = "frontier.json"


@dataclass
class Point:
    name: str
    plan: dict[str, Any]
    status: str
    tokens_per_s: float | None = None
    perplexity: float | None = None
    fast_bytes: float | None = None
    host_bytes: float | None = None
    s_mbu_decode: float | None = None
    record: str | None = None
    plan_detail: dict[str, Any] | None = None  # the full plan (ExpertPlan.to_dict), to serve it again
    frontier: bool = False
    frontier3: bool = False

    def ok(self) -> bool:
        return self.status == "ok" and self.tokens_per_s is not None and self.perplexity is not None


def grid(precisions: Sequence[str], quantize: Sequence[float], offload: Sequence[float],
         mixed: Sequence[float] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(name, plan spec) for every combination of fractions (a configuration with nothing quantized
    appears once), plus one mixture of precisions (every expert its own precision, by frequency x
    sensitivity) per budget in ``mixed``, a share of all experts' bytes at full precision."""
    out: dict[str, dict[str, Any]] = {}
    for off in offload:
        for q in quantize:
            for prec in precisions if q > 0 else precisions[:1]:
                name = f"q{q:g}-{prec}-off{off:g}" if q > 0 else f"full-off{off:g}"
                out[name] = {"quantize_fraction": float(q), "precision": prec, "offload_fraction": float(off)}
    for b in mixed:
        out[f"mixed-b{b:g}"] = {"precisions": list(precisions), "fast_budget_fraction": float(b)}
    return list(out.items())


def pareto_suite(model: str, configs: Sequence[tuple[str, dict[str, Any]]], *, dataset: str, windows: int,
                 input_tokens: int, output_tokens: int, num_prompts: int, batch_size: int, device: str,
                 dtype: str, output_dir: str, fast_budget_gb: float | None = None, group_size: int = 64,
                 profile_windows: int = 8, name: str | None = None, calibration: Any = None) -> dict[str, Any]:
    """The generated suite (a plain dict, validated by ``moecap.suite.parse_suite``)."""
    runners = []
    for cname, spec in configs:
        plan = dict(spec)
        if fast_budget_gb is not None and "precisions" not in plan:
            plan["fast_budget_gb"] = fast_budget_gb
        args = {"dtype": dtype, "plan": plan, "group_size": group_size, "profile_windows": profile_windows}
        if calibration is not None:
            args["calibration"] = calibration
        runners.append({"type": "engine", "name": cname, "args": args})
    slug = Path(model).name if "/" in model else model
    return {
        "name": name or f"pareto-{slug}",
        "description": f"expert placement x precision frontier of {model}: throughput vs {dataset} perplexity",
        "models": [{"id": model}],
        "runners": runners,
        "workloads": [{
            "name": f"decode-in{input_tokens}-out{output_tokens}", "source": "random",
            "input_tokens": input_tokens, "output_tokens": output_tokens, "num_prompts": num_prompts,
            "seed": 0, "ignore_eos": True,
            "perplexity": {"datasets": [dataset], "max_windows": windows},
        }],
        "loads": [{"batch_size": batch_size}],
        "hardware": {"device": device},
        "output": {"dir": output_dir},
    }


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def points_from_outcome(outcome: Any, dataset: str) -> list[Point]:
    pts = []
    for o in outcome.outcomes:
        rec = o.record
        name = o.cell.runner.display_name
        if rec is None:
            from moecap.records import ResultStore

            rec = ResultStore(o.cell.suite.output.dir, o.cell.suite.name).load(o.cell.cell_id)
        if rec is None:
            pts.append(Point(name, dict(o.cell.runner.args.get("plan") or {}), o.status))
            continue
        rep = rec.report or {}
        pts.append(Point(
            name=name,
            plan=_get(rec.config, "runner", "plan") or dict(o.cell.runner.args.get("plan") or {}),
            status=rec.status,
            tokens_per_s=figures.value(rep, "output_tokens_per_s"),
            perplexity=figures.value(rep, f"ppl:{dataset}"),
            fast_bytes=figures.value(rep, "fast_tier_weights_bytes"),
            host_bytes=figures.value(rep, "host_expert_bytes"),
            s_mbu_decode=figures.value(rep, "s_mbu_decode"),
            record=o.path,
            plan_detail=_get(rec.config, "runner", "plan_detail"),
        ))
    mark_frontier(pts)
    return pts


def _dominates(a: Point, b: Point, with_memory: bool) -> bool:
    ge = a.tokens_per_s >= b.tokens_per_s and a.perplexity <= b.perplexity
    gt = a.tokens_per_s > b.tokens_per_s or a.perplexity < b.perplexity
    if with_memory:
        ge = ge and (a.fast_bytes or 0) <= (b.fast_bytes or 0)
        gt = gt or (a.fast_bytes or 0) < (b.fast_bytes or 0)
    return ge and gt


def mark_frontier(points: list[Point]) -> None:
    ok = [p for p in points if p.ok()]
    for p in ok:
        p.frontier = not any(_dominates(q, p, False) for q in ok if q is not p)
        p.frontier3 = not any(_dominates(q, p, True) for q in ok if q is not p)


def frontier(points: Sequence[Point]) -> list[Point]:
    """The throughput/perplexity frontier, by throughput (perplexity then rises with throughput)."""
    return sorted((p for p in points if p.frontier), key=lambda p: p.tokens_per_s)


def select(points: Sequence[Point], max_perplexity: float | None = None,
           min_tokens_per_s: float | None = None) -> Point | None:
    """Best throughput with perplexity <= ``max_perplexity``, or best perplexity with tokens/s >=
    ``min_tokens_per_s`` (both: best throughput meeting both); None when nothing qualifies."""
    ok = [p for p in points if p.ok()
          and (max_perplexity is None or p.perplexity <= max_perplexity)
          and (min_tokens_per_s is None or p.tokens_per_s >= min_tokens_per_s)]
    if not ok:
        return None
    if max_perplexity is not None or min_tokens_per_s is None:
        return max(ok, key=lambda p: (p.tokens_per_s, -p.perplexity))
    return min(ok, key=lambda p: (p.perplexity, -p.tokens_per_s))


def write_frontier(points: Sequence[Point], out_dir: Path, meta: dict[str, Any]) -> dict[str, str]:
    """``frontier.json`` (every point, flags, plans), ``frontier.png`` and ``frontier.html``."""
    from moecap.paths import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "points": [vars(p) for p in points],
            "frontier": [p.name for p in frontier(points)]}
    atomic_write_text(out_dir / FRONTIER_FILE, json.dumps(data, indent=1) + "\n")
    files = {"json": str(out_dir / FRONTIER_FILE)}
    files["png"] = str(_plot_png(points, out_dir / "frontier.png", meta))
    files["html"] = str(_plot_html(points, out_dir / "frontier.html", meta))
    return files


def load_frontier(path: str | Path) -> list[Point]:
    path = Path(path)
    if path.is_dir():
        path = path / FRONTIER_FILE
    data = json.loads(path.read_text())
    return [Point(**p) for p in data["points"]]


def _plot_png(points: Sequence[Point], path: Path, meta: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if p.ok()]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    mem = [(p.fast_bytes or 0) / 2**20 for p in ok]
    sc = ax.scatter([p.tokens_per_s for p in ok], [p.perplexity for p in ok], c=mem, cmap="viridis", s=60,
                    edgecolors=["red" if p.frontier3 else "none" for p in ok], linewidths=1.2, zorder=3)
    fig.colorbar(sc, ax=ax, label="fast-tier weights (MiB)")
    front = frontier(ok)
    ax.plot([p.tokens_per_s for p in front], [p.perplexity for p in front], "r--", lw=1.5, zorder=2,
            label="throughput / perplexity frontier")
    for p in ok:  # names on the frontier points only (the HTML plot names every point on hover)
        if p.frontier or p.frontier3:
            ax.annotate(p.name, (p.tokens_per_s, p.perplexity), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decode throughput (output tokens/s)")
    ax.set_ylabel(f"perplexity ({meta.get('dataset', '')})")
    ax.set_title(f"{meta.get('model', '')}: expert placement x precision ({meta.get('device', '')})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_html(points: Sequence[Point], path: Path, meta: dict[str, Any]) -> Path:
    from moecap.paths import atomic_write_text

    ok = [p for p in points if p.ok()]
    try:
        import plotly.graph_objects as go

        front = frontier(ok)
        fig = go.Figure()
        fig.add_trace(go.Scatter(
            x=[p.tokens_per_s for p in ok], y=[p.perplexity for p in ok], mode="markers+text",
            text=[p.name for p in ok], textposition="top center",
            marker={"size": 11, "color": [(p.fast_bytes or 0) / 2**20 for p in ok], "colorscale": "Viridis",
                    "colorbar": {"title": "fast MiB"}, "line": {"width": [2 if p.frontier3 else 0 for p in ok],
                                                                "color": "red"}},
            customdata=[[json.dumps(p.plan)[:300], p.s_mbu_decode] for p in ok],
            hovertemplate="%{text}<br>%{x:.1f} tok/s, ppl %{y:.2f}<br>S-MBU %{customdata[1]:.3f}<extra></extra>",
            name="configurations"))
        fig.add_trace(go.Scatter(x=[p.tokens_per_s for p in front], y=[p.perplexity for p in front],
                                 mode="lines", line={"dash": "dash", "color": "red"}, name="frontier"))
        fig.update_layout(title=f"{meta.get('model', '')}: expert placement x precision",
                          xaxis_title="decode throughput (output tokens/s)",
                          yaxis_title=f"perplexity ({meta.get('dataset', '')})")
        html = fig.to_html(include_plotlyjs="cdn", full_html=True)
    except ImportError:  # plotly is the leaderboard extra: without it, a table
        rows = "".join(
            f"<tr><td>{p.name}</td><td>{p.tokens_per_s:.1f}</td><td>{p.perplexity:.3f}</td>"
            f"<td>{(p.fast_bytes or 0) / 2**20:.2f}</td><td>{'yes' if p.frontier else ''}</td></tr>" for p in ok)
        html = ("<html><body><img src='frontier.png'><table border=1><tr><th>config</th><th>tok/s</th>"
                f"<th>perplexity</th><th>fast MiB</th><th>frontier</th></tr>{rows}</table></body></html>")
    atomic_write_text(path, html)
    return path


def format_points(points: Sequence[Point]) -> str:
    head = f"{'configuration':24s} {'status':7s} {'tok/s':>9s} {'ppl':>9s} {'fast MiB':>9s} {'host MiB':>9s} {'S-MBU':>7s}  frontier"
    lines = [head, "-" * len(head)]
    for p in sorted(points, key=lambda p: (-(p.tokens_per_s or -math.inf))):
        def f(v: Any, fmt: str) -> str:
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        lines.append(f"{p.name:24s} {p.status:7s} {f(p.tokens_per_s, '9.1f')} {f(p.perplexity, '9.3f')} "
                     f"{f((p.fast_bytes or 0) / 2**20 if p.fast_bytes is not None else None, '9.2f')} "
                     f"{f((p.host_bytes or 0) / 2**20 if p.host_bytes is not None else None, '9.2f')} "
                     f"{f(p.s_mbu_decode, '7.3f')}  {'*' if p.frontier else ('+' if p.frontier3 else '')}")
    lines.append("* throughput/perplexity frontier   + also frontier once fast-tier memory counts")
    return "\n".join(lines)
