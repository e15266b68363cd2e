"""The leaderboard's plots (plotly figures from the data layer's frame; no gradio).

Every plot colours a system the same way (:func:`system_colors`, from every system of the loaded
records, so a filter does not repaint them).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moecap import figures
from moecap.leaderboard.data import column, pareto_front

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
PHASES = ("prefill", "decode")
LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))
LATENCY_STATS = (("mean", "mean"), ("median", "p50"), ("p90", "p90"), ("p99", "p99"))

def _plain(value: Any) -> str:
    """A name shown in a plot as text: plotly renders a subset of HTML in legends and hovers (an
    ``<a href>`` in a system name would become a live link), so markup characters are escaped."""
    import html

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



def _series_name(row: pd.Series) -> str:
    parts = [str(row.get(k)) for k in ("system", "model") if pd.notna(row.get(k))]
    extra = [str(row.get(k)) for k in ("hardware", "precision") if pd.notna(row.get(k))]
    name = " · ".join(parts) or "?"
    return f"{name} ({', '.join(extra)})" if extra else name


def _empty_fig(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14})
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=380,
                      template="plotly_white")
    return fig



# --------------------------------------------------------------------------------------------
# figures


def scatter_figure(df: pd.DataFrame, x: str, y: str) -> go.Figure:
    """A scatter of ``y`` against ``x`` (column keys), one colour per system, with the Pareto
    front (direction from ``Column.higher_is_better``) drawn larger, outlined and joined by a
    step line."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    data = df.assign(_x=_num(df, x), _y=_num(df, y)).dropna(subset=["_x", "_y"])
    if data.empty:
        return _empty_fig(f"No row has both {_label(x)} and {_label(y)}.")
    hx, hy = _hib(x), _hib(y)
    front = pareto_front(data, [(x, hx), (y, hy)]).reindex(data.index).fillna(False).astype(bool)
    fig = go.Figure()
    systems = sorted(data["system"].astype(str).unique())
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(systems)}
    for s in systems:
        sub = data[data["system"].astype(str) == s]
        on = front.loc[sub.index]
        hover = [
            f"<b>{_plain(r.get('model'))}</b><br>{_plain(r.get('system'))} · {_plain(r.get('hardware'))} · "
            f"{_plain(r.get('precision'))} · {_plain(r.get('load'))}<br>{_label(x)}: {r['_x']:.4g}<br>"
            f"{_label(y)}: {r['_y']:.4g}<br>{_plain(r.get('cell_id'))}"
            for _, r in sub.iterrows()
        ]
        fig.add_trace(go.Scatter(
            x=sub["_x"], y=sub["_y"], mode="markers", name=_plain(s), legendgroup=s,
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
    fig.update_layout(
        template="plotly_white", height=430, margin={"l": 60, "r": 20, "t": 40, "b": 60},
        title={"text": f"{_label(y)} vs {_label(x)}", "font": {"size": 14}},
        xaxis_title=f"{_label(x)} {'(better →)' if hx else '(← better)'}",
        yaxis_title=f"{_label(y)} {'(better ↑)' if hy else '(better ↓)'}",
        legend={"title": {"text": "system"}},
    )
    return fig


def radar_figure(df: pd.DataFrame, systems: list[str] | None) -> go.Figure:
    """C (cost, lower better), A (accuracy, or 1/perplexity), P (output throughput) per
    system: each system's best over its shown rows, divided by the best system's (so 1 is the
    best of the shown rows and 0 the worst possible)."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    data = df if systems is None else df[df["system"].astype(str).isin([str(s) for s in systems])]
    if data.empty:
        return _empty_fig("Pick at least one system.")
    cost, acc, ppl, thr = (_num(data, k) for k in
                           ("usd_per_1m_output_tokens", "accuracy", "perplexity", "output_tokens_per_s"))
    use_acc = bool(acc.notna().any())
    g = pd.DataFrame({
        "system": data["system"].astype(str),
        "C": cost,
        "A": acc if use_acc else 1.0 / ppl.where(ppl > 0),
        "P": thr,
    }).groupby("system").agg({"C": "min", "A": "max", "P": "max"})

    def ratio(col: pd.Series, higher: bool) -> pd.Series:
        col = col.where(col > 0)
        if col.notna().sum() == 0:
            return col.fillna(0.0)
        best = col.max() if higher else col.min()
        return (col / best if higher else best / col).fillna(0.0).clip(0, 1)

    norm = pd.DataFrame({"C": ratio(g["C"], False), "A": ratio(g["A"], True),
                         "P": ratio(g["P"], True)})
    theta = ["C: cost (lower $ better)",
             "A: accuracy" if use_acc else "A: 1/perplexity",
             "P: output throughput"]
    fig = go.Figure()
    for i, (s, r) in enumerate(norm.iterrows()):
        raw = g.loc[s]
        vals = [r["C"], r["A"], r["P"]]
        fig.add_trace(go.Scatterpolar(
            r=vals + vals[:1], theta=theta + theta[:1], fill="toself", name=_plain(s),
            line={"color": PALETTE[i % len(PALETTE)]}, opacity=0.7,
            text=[f"$ {raw['C']:.4g}/1M tok", f"{raw['A']:.4g}", f"{raw['P']:.4g} tok/s",
                  f"$ {raw['C']:.4g}/1M tok"],
            hovertemplate="%{theta}: %{r:.2f} (raw %{text})<extra>" + _plain(s) + "</extra>",
        ))
    fig.update_layout(
        template="plotly_white", height=430, margin={"l": 60, "r": 60, "t": 40, "b": 40},
        polar={"radialaxis": {"range": [0, 1], "visible": True}},
        title={"text": "C / A / P, normalised (1 = best of the shown rows)", "font": {"size": 14}},
    )
    return fig


ROOFLINE_PANELS = (
    ("s_mbu_decode", "S-MBU decode"), ("s_mbu_prefill", "S-MBU prefill"),
    ("s_mfu_decode", "S-MFU decode"), ("s_mfu_prefill", "S-MFU prefill"),
)


def roofline_figure(df: pd.DataFrame) -> go.Figure:
    """S-MBU and S-MFU (decode, prefill) against batch size; one line per system/model."""
    if df.empty:
        return _empty_fig("No rows match the filters.")
    data = df.assign(_bs=_num(df, "batch_size")).dropna(subset=["_bs"])
    if data.empty:
        return _empty_fig("No row has a batch size.")
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in ROOFLINE_PANELS],
                        horizontal_spacing=0.08, vertical_spacing=0.2)
    data = data.assign(_series=[_series_name(r) for _, r in data.iterrows()])
    for i, (name, sub) in enumerate(data.groupby("_series", sort=True)):
        sub = sub.sort_values("_bs")
        color = PALETTE[i % len(PALETTE)]
        for j, (key, title) in enumerate(ROOFLINE_PANELS):
            vals = _num(sub, key)
            fig.add_trace(go.Scatter(
                x=sub["_bs"], y=vals, mode="lines+markers", name=_plain(name), legendgroup=name,
                showlegend=(j == 0), line={"color": color}, marker={"size": 8},
                text=[_plain(c) for c in sub["cell_id"].astype(str)],
                hovertemplate=f"{_plain(name)}<br>batch %{{x}}<br>{title}: %{{y:.2%}}<br>%{{text}}"
                              "<extra></extra>",
            ), row=j // 2 + 1, col=j % 2 + 1)
    fig.update_xaxes(title_text="batch size", type="log", dtick=math.log10(2))
    fig.update_yaxes(tickformat=".3~%", rangemode="tozero")
    fig.update_layout(template="plotly_white", height=620,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.12})
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
    if not fig.data:
        return _empty_fig("This record has no per-component byte counts.")
    fig.update_layout(template="plotly_white", barmode="group", height=380,
                      title={"text": "Bytes moved by component, per phase", "font": {"size": 14}},
                      yaxis_title="MB (whole run)", margin={"l": 60, "r": 20, "t": 40, "b": 60})
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
    if not fig.data:
        return _empty_fig("This record has no latency distribution.")
    fig.update_layout(template="plotly_white", barmode="group", height=380,
                      title={"text": "Latency distribution", "font": {"size": 14}},
                      yaxis_title="ms", margin={"l": 60, "r": 20, "t": 40, "b": 40})
    return fig


