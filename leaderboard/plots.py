"""The leaderboard's plots (plotly figures from the data layer's frame; no gradio).

Every plot colours a system the same way: :func:`system_colors` gives one colour per system, and the
app computes it once from every loaded row and passes it to :func:`scatter_figure`,
:func:`radar_figure` and :func:`roofline_figure` (``colors=``), so a filter never repaints a system.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from moecap import figures
from moecap.leaderboard.data import column, pareto_front

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
PHASES = ("prefill", "decode")
LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))
LATENCY_STATS = (("mean", "mean"), ("median", "p50"), ("p90", "p90"), ("p99", "p99"))
UTILIZATION_PREFIXES = ("s_mbu", "s_mfu")  # stored as fractions, shown in %
# the legend under the plot area, left-aligned, so many systems never squeeze the plot
LEGEND_BELOW = {"title": {"text": "system", "side": "top"}, "orientation": "h", "x": 0, "xanchor": "left",
                "yref": "container", "y": 0, "yanchor": "bottom"}


def _plain(value: Any) -> str:
    """A name shown in a plot as text: plotly renders a subset of HTML in legends and hovers (an
    ``<a href>`` in a system name would become a live link), so markup characters are escaped."""
    return html.escape(str(value), quote=False)


def _label(key: str) -> str:
    try:
        return column(key).header
    except Exception:
        return key


def _hib(key: str) -> bool:
    try:
        hib = column(key).higher_is_better
    except Exception:
        hib = None
    return True if hib is None else bool(hib)


def _num(df: pd.DataFrame, key: str) -> pd.Series:
    if key not in df.columns:
        return pd.Series([float("nan")] * len(df), index=df.index, dtype="float64")
    return pd.to_numeric(df[key], errors="coerce").astype("float64")


def _is_utilization(key: str) -> bool:
    return str(key).startswith(UTILIZATION_PREFIXES)


def _is_accuracy(key: str) -> bool:
    """The figure is an accuracy (a fraction in [0, 1]): ``accuracy`` or an lm-eval ``<task>:acc*``."""
    key = str(key)
    if key == "accuracy":
        return True
    task, sep, metric = key.partition(":")
    return bool(sep) and task != "ppl" and metric.startswith("acc")


def _axis_label(key: str) -> str:
    """The label with its unit; a utilization's unit is % (its ticks are formatted as percent)."""
    if _is_utilization(key):
        try:
            return f"{column(key).label} (%)"
        except Exception:
            return f"{key} (%)"
    return _label(key)


def _value_text(key: str, v: float) -> str:
    """``label: value`` for a hover; a utilization in %."""
    if _is_utilization(key):
        try:
            name = column(key).label
        except Exception:
            name = key
        return f"{name}: {100 * v:.3g}%"
    return f"{_label(key)}: {v:.4g}"


def _systems(df: pd.DataFrame) -> pd.Series:
    if "system" not in df.columns:
        return pd.Series(["None"] * len(df), index=df.index, dtype=object)
    return df["system"].astype(str)


def system_colors(df: pd.DataFrame) -> dict[str, str]:
    """One colour per system of ``df``: its sorted system names -> :data:`PALETTE`, cycling. Compute it
    once from every loaded row and pass it to the figures, so a filter never repaints a system."""
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(set(_systems(df))))}


def _colors(df: pd.DataFrame, colors: dict[str, str] | None) -> dict[str, str]:
    """``colors`` (None: :func:`system_colors` of ``df``), completed for a system it lacks."""
    out = system_colors(df) if colors is None else dict(colors)
    for s in sorted(set(_systems(df)) - set(out)):
        out[s] = PALETTE[len(out) % len(PALETTE)]
    return out


def _series_name(row: pd.Series) -> str:
    parts = [str(row.get(k)) for k in ("system", "model") if pd.notna(row.get(k))]
    extra = [str(row.get(k)) for k in ("hardware", "precision") if pd.notna(row.get(k))]
    name = " · ".join(parts) or "?"
    return f"{name} ({', '.join(extra)})" if extra else name


def _si(v: float, unit: str) -> str:
    """``v`` with an SI prefix, e.g. ``1.45 GFLOP/s``."""
    if not v or not math.isfinite(v):
        return f"{v:.3g} {unit}"
    exp = max(-4, min(5, int(math.floor(math.log10(abs(v)) / 3))))
    prefix = {-4: "p", -3: "n", -2: "µ", -1: "m", 0: "", 1: "k", 2: "M", 3: "G", 4: "T", 5: "P"}[exp]
    return f"{v / 10 ** (3 * exp):.3g} {prefix}{unit}"


def _empty_fig(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14})
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=380,
                      template="plotly_white")
    return fig


# --------------------------------------------------------------------------------------------
# figures


def scatter_figure(df: pd.DataFrame, x: str, y: str, colors: dict[str, str] | None = None) -> go.Figure:
    """A scatter of ``y`` against ``x`` (column keys), coloured by system (``colors``: system ->
    colour, None: :func:`system_colors` of ``df``), with the Pareto front (direction from
    ``Column.higher_is_better``) drawn larger, outlined and joined by a step line. An accuracy axis
    (``accuracy``, ``<task>:acc*``) spans [0, 1]; a utilization axis (S-MBU, S-MFU) reads in %. The
    legend ("system") sits under the plot."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    colors = _colors(df, colors)
    data = df.assign(_x=_num(df, x), _y=_num(df, y)).dropna(subset=["_x", "_y"])
    if data.empty:
        return _empty_fig(f"No row has both {_label(x)} and {_label(y)}.")
    hx, hy = _hib(x), _hib(y)
    front = pareto_front(data, [(x, hx), (y, hy)]).reindex(data.index).fillna(False).astype(bool)
    fig = go.Figure()
    names = _systems(data)
    for s in sorted(names.unique()):
        sub = data[names == s]
        on = front.loc[sub.index]
        hover = [
            f"<b>{_plain(r.get('model'))}</b><br>{_plain(r.get('system'))} · {_plain(r.get('hardware'))} · "
            f"{_plain(r.get('precision'))} · {_plain(r.get('load'))}<br>{_value_text(x, r['_x'])}<br>"
            f"{_value_text(y, r['_y'])}<br>{_plain(r.get('cell_id'))}"
            for _, r in sub.iterrows()
        ]
        fig.add_trace(go.Scatter(
            x=sub["_x"], y=sub["_y"], mode="markers", name=_plain(s), legendgroup=s, cliponaxis=False,
            marker={
                "color": colors[s],
                "size": [16 if f else 9 for f in on],
                "line": {"color": ["black" if f else "white" for f in on],
                         "width": [2.5 if f else 0.5 for f in on]},
                "symbol": ["diamond" if f else "circle" for f in on],
            },
            text=hover, hovertemplate="%{text}<extra></extra>",
        ))
    fr = data[front].sort_values("_x")
    if len(fr):
        # the corner between two front points is the worse one on both axes
        fig.add_trace(go.Scatter(
            x=fr["_x"], y=fr["_y"], mode="lines", name="Pareto front",
            line={"color": "black", "dash": "dot", "width": 1.5, "shape": "vh" if hx else "hv"},
            hoverinfo="skip",
        ))

    def axis(key: str, higher: bool, arrows: tuple[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"title": {"text": f"{_axis_label(key)} {arrows[0] if higher else arrows[1]}"}}
        if _is_accuracy(key):
            out["range"] = [0, 1]
        if _is_utilization(key):
            out["tickformat"] = ".3~%"
        return out

    fig.update_layout(
        template="plotly_white", height=480, margin={"l": 60, "r": 20, "t": 40, "b": 20},
        title={"text": f"{_axis_label(y)} vs {_axis_label(x)}", "font": {"size": 14}},
        xaxis=axis(x, hx, ("(better →)", "(← better)")),
        yaxis=axis(y, hy, ("(better ↑)", "(better ↓)")),
        legend=LEGEND_BELOW,
    )
    return fig


RADAR_AXES = ("C", "A", "P")


def radar_figure(df: pd.DataFrame, systems: list[str] | None = None, best_by: str = "output_tokens_per_s",
                 colors: dict[str, str] | None = None) -> go.Figure:
    """C (cost, lower better), A (accuracy, or 1/perplexity when no chosen row has an accuracy), P
    (output throughput) of ONE real configuration per system (``systems``: those shown, None: all):
    the system's row that is best on ``best_by`` (direction from ``Column.higher_is_better``; rows
    without that figure are not candidates; among equals the row with more of C, A, P). A system
    with no candidate is left out, and the title says so. Each value is divided by the best chosen
    row's (1 = best of the chosen rows); a missing or non-positive value is left out (no point on
    that axis), never drawn as 0. Each trace's points carry the row's ``cell_id`` (``customdata``),
    its raw values are in the trace's ``meta`` and in the hover, with units; colours by system as in
    :func:`scatter_figure`."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    colors = _colors(df, colors)
    data = df if systems is None else df[_systems(df).isin([str(s) for s in systems])]
    if data.empty:
        return _empty_fig("Pick at least one system.")
    names = _systems(data)
    cost, acc, ppl, thr = (_num(data, k) for k in
                           ("usd_per_1m_output_tokens", "accuracy", "perplexity", "output_tokens_per_s"))
    key, higher = _num(data, best_by), _hib(best_by)
    # how many of C, A, P a row has: breaks a tie on best_by
    complete = cost.notna().astype(int) + (acc.notna() | ppl.notna()).astype(int) + thr.notna().astype(int)
    chosen: dict[str, Any] = {}
    by = _label(best_by)
    left_out: list[str] = []  # "system (why)"
    for s in sorted(names.unique()):
        cand = key[(names == s) & key.map(math.isfinite)]
        if cand.empty:
            left_out.append(f"{_plain(s)} (no {_plain(by)})")
            continue
        tied = cand.index[cand == (cand.max() if higher else cand.min())]
        chosen[s] = complete.loc[tied].idxmax()  # the first of the most complete
    if not chosen:
        return _empty_fig(f"No shown row has {_plain(by)}: no configuration to draw.")
    idx = list(chosen.values())
    use_acc = bool(acc.loc[idx].notna().any())
    raw = pd.DataFrame({"C": cost.loc[idx], "A": acc.loc[idx] if use_acc else ppl.loc[idx],
                        "P": thr.loc[idx]}, index=idx)
    score = raw.assign(A=raw["A"] if use_acc else 1.0 / raw["A"].where(raw["A"] > 0))

    def ratio(col: pd.Series, higher: bool) -> pd.Series:
        col = col.where(col > 0)
        if col.notna().sum() == 0:
            return col
        best = col.max() if higher else col.min()
        return (col / best if higher else best / col).clip(0, 1)

    norm = pd.DataFrame({"C": ratio(score["C"], False), "A": ratio(score["A"], True),
                         "P": ratio(score["P"], True)})
    theta = {"C": "C: cost (lower $ better)", "A": "A: accuracy" if use_acc else "A: 1/perplexity",
             "P": "P: output throughput"}
    units = {"C": lambda v: f"$ {v:.4g}/1M tok", "A": (lambda v: f"accuracy {v:.4g}") if use_acc
             else (lambda v: f"perplexity {v:.4g}"), "P": lambda v: f"{v:.4g} tok/s"}
    fig = go.Figure()
    for s, i in chosen.items():
        axes = [a for a in RADAR_AXES if pd.notna(norm.at[i, a])]
        if not axes:
            left_out.append(f"{_plain(s)} (no cost, accuracy or throughput)")
            continue
        cell = str(data.at[i, "cell_id"]) if "cell_id" in data.columns else ""
        r = [float(norm.at[i, a]) for a in axes]
        text = [units[a](float(raw.at[i, a])) for a in axes]
        fig.add_trace(go.Scatterpolar(
            r=r + r[:1], theta=[theta[a] for a in axes + axes[:1]], fill="toself", name=_plain(s),
            mode="lines+markers", line={"color": colors[s]}, marker={"color": colors[s], "size": 7},
            opacity=0.7, customdata=[cell] * (len(axes) + 1), text=text + text[:1],
            meta={"cell_id": cell, "raw": {a: (None if pd.isna(raw.at[i, a]) else float(raw.at[i, a]))
                                           for a in RADAR_AXES}},
            hovertemplate="%{theta}: %{r:.2f} (raw %{text})<br>cell %{customdata}<extra>" + _plain(s)
                          + "</extra>",
        ))
    if not fig.data:
        return _empty_fig("No chosen row has cost, accuracy or throughput.")
    title = (f"C / A / P of each system's best row by {by} ({'highest' if higher else 'lowest'}), "
             "normalised (1 = best of the chosen rows)")
    if left_out:
        title += "<br><sup>left out: " + "; ".join(left_out) + "</sup>"
    fig.update_layout(
        template="plotly_white", height=480, margin={"l": 60, "r": 60, "t": 70 if left_out else 50, "b": 20},
        polar={"radialaxis": {"range": [0, 1], "visible": True},
               # every axis stays on the chart even where no system has a point on it
               "angularaxis": {"type": "category", "categoryorder": "array",
                               "categoryarray": [theta[a] for a in RADAR_AXES]}},
        title={"text": title, "font": {"size": 14}},
        legend=LEGEND_BELOW,
    )
    return fig


PHASE_SYMBOLS = {"decode": "circle", "prefill": "diamond"}
MODEL_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
ROOF_STYLES = (("#222222", "solid"), ("#777777", "dash"), ("#444444", "dot"), ("#999999", "dashdot"))
def peak_kind_label(kind: Any) -> str:
    """How the roofline names a peak's kind (the ``peak_kind`` column: calibrated on the machine,
    datasheet, user-supplied); "kind not recorded" where the record does not say."""
    return str(kind) if isinstance(kind, str) and kind else "kind not recorded"


def roofline_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per record and phase that has attained FLOP/s and bytes/s (both > 0): the row's
    identity, ``phase``, ``flops_s`` (FLOP/s = ``achieved_tflops_<phase>`` x 1e12), ``bytes_s`` (B/s),
    ``intensity`` (FLOP/byte = flops_s / bytes_s), its S-MBU / S-MFU and peaks."""
    out = []
    for phase in ("decode", "prefill"):
        flops = _num(df, f"achieved_tflops_{phase}") * 1e12
        bw = _num(df, f"achieved_bandwidth_gbs_{phase}") * 1e9
        ok = (flops > 0) & (bw > 0) & flops.map(math.isfinite) & bw.map(math.isfinite)
        if not ok.any():
            continue
        sub = df[ok]
        out.append(pd.DataFrame({
            "system": _systems(sub), "model": sub.get("model"), "hardware": sub.get("hardware"),
            "precision": sub.get("precision"), "load": sub.get("load"), "batch_size": _num(sub, "batch_size"),
            "cell_id": sub.get("cell_id"), "phase": phase, "flops_s": flops[ok], "bytes_s": bw[ok],
            "intensity": flops[ok] / bw[ok],
            "s_mbu": _num(sub, f"s_mbu_{phase}"), "s_mfu": _num(sub, f"s_mfu_{phase}"),
            "peak_tflops": _num(sub, "peak_tflops"), "peak_mem_bandwidth_gbs": _num(sub, "peak_mem_bandwidth_gbs"),
            "peak_kind": sub["peak_kind"] if "peak_kind" in sub.columns else None,
        }, index=sub.index))
    return pd.concat(out) if out else pd.DataFrame()


def roofline_figure(df: pd.DataFrame, colors: dict[str, str] | None = None) -> go.Figure:
    """A roofline, log-log: x = arithmetic intensity (FLOP per byte moved: attained FLOP/s over
    attained bytes/s of the phase's passes), y = attained FLOP/s; one point per record and phase
    (decode ●, prefill ◆), coloured by system as in :func:`scatter_figure`, a model's points of a
    phase joined in batch-size order (one dash per model). For each peak seen in the shown rows
    (hardware, peak FLOP/s, peak bandwidth, kind), its ceilings: the memory roof (peak bandwidth x
    intensity, up to the ridge) and the compute roof (peak FLOP/s, from the ridge), labelled with
    the peak values and whether the peak is calibrated or from the datasheet. The hover shows the
    phase's S-MBU and S-MFU in %."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    colors = _colors(df, colors)
    pts = roofline_points(df)
    if pts.empty:
        return _empty_fig("No row has attained FLOP/s and bytes/s.")
    fig = go.Figure()
    # the ceilings, one set per distinct peak of the shown rows
    peaks = pts[["hardware", "peak_tflops", "peak_mem_bandwidth_gbs", "peak_kind"]].astype(object) \
        .where(pts[["hardware", "peak_tflops", "peak_mem_bandwidth_gbs", "peak_kind"]].notna(), None) \
        .drop_duplicates()
    peaks = [r for _, r in peaks.iterrows() if r["peak_tflops"] is not None or r["peak_mem_bandwidth_gbs"] is not None]
    ridges = [float(p["peak_tflops"]) * 1e12 / (float(p["peak_mem_bandwidth_gbs"]) * 1e9) for p in peaks
              if p["peak_tflops"] and p["peak_mem_bandwidth_gbs"]]
    xs = list(pts["intensity"]) + ridges
    lo, hi = min(xs) / 4, max(xs) * 4
    ys = list(pts["flops_s"])  # the y range: the points and the roofs, with room for the labels
    annotations = []
    for j, p in enumerate(peaks):
        color, dash = ROOF_STYLES[j % len(ROOF_STYLES)]
        kind = peak_kind_label(p["peak_kind"])
        hw = _plain(p["hardware"]) if p["hardware"] is not None else "?"
        top = float(p["peak_tflops"]) * 1e12 if p["peak_tflops"] else None
        bw = float(p["peak_mem_bandwidth_gbs"]) * 1e9 if p["peak_mem_bandwidth_gbs"] else None
        ridge = top / bw if top and bw else None
        ys += [v for v in (top, bw * lo if bw else None) if v]
        meta = {"hardware": p["hardware"], "peak_tflops": p["peak_tflops"],
                "peak_mem_bandwidth_gbs": p["peak_mem_bandwidth_gbs"], "kind": kind}
        if bw:
            end = ridge or hi
            name = f"{hw}: memory roof, {p['peak_mem_bandwidth_gbs']:.4g} GB/s ({kind})"
            fig.add_trace(go.Scatter(
                x=[lo, end], y=[bw * lo, bw * end], mode="lines", name=name, legendgroup=f"peak{j}",
                line={"color": color, "dash": dash, "width": 2}, meta={**meta, "roof": "memory"},
                hovertemplate=name + "<br>%{x:.3g} FLOP/byte → %{y:.3s}FLOP/s<extra></extra>",
            ))
            mid = math.sqrt(lo * end)  # the label sits above the roof's middle (log scale)
            annotations.append({"x": math.log10(mid), "y": math.log10(bw * mid), "xanchor": "right",
                                "yanchor": "bottom", "text": f"{hw} {p['peak_mem_bandwidth_gbs']:.4g} GB/s "
                                                              f"({kind})", "font": {"color": color}})
        if top:
            start = ridge or lo
            name = f"{hw}: compute roof, {p['peak_tflops']:.4g} TFLOP/s ({kind})"
            fig.add_trace(go.Scatter(
                x=[start, hi], y=[top, top], mode="lines", name=name, legendgroup=f"peak{j}",
                line={"color": color, "dash": dash, "width": 2}, meta={**meta, "roof": "compute"},
                hovertemplate=name + "<extra></extra>",
            ))
            annotations.append({"x": math.log10(hi), "y": math.log10(top), "xanchor": "right",
                                "yanchor": "bottom", "text": f"{hw} peak {p['peak_tflops']:.4g} TFLOP/s "
                                                              f"({kind})", "font": {"color": color}})
    # the points: one trace per system, model (hardware, precision) and phase
    pts = pts.assign(_series=[_series_name(r) for _, r in pts.iterrows()])
    models = sorted({str(m) for m in pts["model"]})
    for (name, phase), sub in pts.groupby(["_series", "phase"], sort=True):
        sub = sub.sort_values(["batch_size", "intensity"], na_position="last", kind="stable")
        s = str(sub["system"].iloc[0])
        hover = [
            f"<b>{_plain(r['model'])}</b><br>{_plain(r['system'])} · {_plain(r['hardware'])} · "
            f"{_plain(r['precision'])} · {_plain(r['load'])}<br>{phase}: {r['intensity']:.3g} FLOP/byte, "
            f"{_si(r['flops_s'], 'FLOP/s')}, {_si(r['bytes_s'], 'B/s')}<br>"
            f"S-MBU {phase}: {'n/a' if pd.isna(r['s_mbu']) else format(100 * r['s_mbu'], '.3g') + '%'} · "
            f"S-MFU {phase}: {'n/a' if pd.isna(r['s_mfu']) else format(100 * r['s_mfu'], '.3g') + '%'}<br>"
            f"{_plain(r['cell_id'])}"
            for _, r in sub.iterrows()
        ]
        fig.add_trace(go.Scatter(
            x=sub["intensity"], y=sub["flops_s"], mode="lines+markers" if len(sub) > 1 else "markers",
            name=f"{_plain(name)} · {phase}", legendgroup=s,
            line={"color": colors[s], "width": 1, "dash": MODEL_DASHES[models.index(str(sub['model'].iloc[0]))
                                                                     % len(MODEL_DASHES)]},
            marker={"color": colors[s], "size": 11, "symbol": PHASE_SYMBOLS[phase],
                    "line": {"color": "white", "width": 1}},
            customdata=list(sub["cell_id"].astype(str)), text=hover, hovertemplate="%{text}<extra></extra>",
        ))
    y_range = [math.log10(min(ys)) - 0.15, math.log10(max(ys)) + 0.35]
    decades = range(math.ceil(y_range[0]), math.floor(y_range[1]) + 1)
    fig.update_layout(
        template="plotly_white", height=560, margin={"l": 70, "r": 20, "t": 50, "b": 20},
        title={"text": "Roofline: attained FLOP/s vs arithmetic intensity, per record and phase "
                       "(● decode, ◆ prefill)", "font": {"size": 14}},
        xaxis={"type": "log", "title": {"text": "arithmetic intensity (FLOP/byte, log scale)"},
               "range": [math.log10(lo), math.log10(hi)], "dtick": 1, "exponentformat": "none"},
        yaxis={"type": "log", "title": {"text": "attained FLOP/s (log scale)"}, "range": y_range,
               "tickvals": [10.0 ** k for k in decades], "ticktext": [_si(10.0 ** k, "FLOP/s") for k in decades]},
        legend={**LEGEND_BELOW, "title": {"text": "system · model (hardware, precision) · phase, and the "
                                                  "ceilings", "side": "top"}},
        annotations=[{**a, "xref": "x", "yref": "y", "showarrow": False} for a in annotations],
    )
    return fig



def bytes_figure(record: dict[str, Any]) -> go.Figure:
    report = record.get("report") or {}
    fig = go.Figure()
    for i, phase in enumerate(PHASES):
        comps = figures.byte_components(report, phase)
        if not comps:
            continue
        fig.add_trace(go.Bar(x=list(comps), y=[v / 1e6 for v in comps.values()], name=phase,
                             marker_color=PALETTE[i]))
    return _grouped_bars(fig, "This record has no per-component byte counts.",
                         "Bytes moved by component, per phase", "MB (whole run)", bottom=60)


def _grouped_bars(fig: go.Figure, empty: str, title: str, yaxis: str, bottom: int) -> go.Figure:
    """A record's grouped bar chart laid out (or the empty figure saying ``empty`` when it has no bars)."""
    if not fig.data:
        return _empty_fig(empty)
    fig.update_layout(template="plotly_white", barmode="group", height=380, title={"text": title, "font": {"size": 14}},
                      yaxis_title=yaxis, margin={"l": 60, "r": 20, "t": 40, "b": bottom})
    return fig


def latency_figure(record: dict[str, Any]) -> go.Figure:
    report = record.get("report") or {}
    fig = go.Figure()
    for i, (stat, stat_label) in enumerate(LATENCY_STATS):
        xs, ys = [], []
        for key, label in LATENCY_METRICS:
            v = figures.value(report, f"{key}_{stat_label}")
            if isinstance(v, (int, float)) and v == v:
                xs.append(label)
                ys.append(v)
        if xs:
            fig.add_trace(go.Bar(x=xs, y=ys, name=stat_label, marker_color=PALETTE[i]))
    return _grouped_bars(fig, "This record has no latency distribution.", "Latency distribution", "ms", bottom=40)


