"""The leaderboard's plots (pure plotly figures, no browser): one colour per system everywhere, the
scatter's axes, the radar's one real configuration per system, the roofline's points and ceilings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecap import figures
from moecap.leaderboard.data import _frame, empty_frame, load_results, merge_quality
from moecap.leaderboard.plots import (
    PALETTE,
    peak_kind_label,
    radar_figure,
    roofline_figure,
    scatter_figure,
    system_colors,
)

ALL_FIGURES = (scatter_figure, radar_figure, roofline_figure)


# ------------------------------------------------------------------------------------------ records


def _phase(bw_gbs: float, tflops: float, time_s: float, s_mbu: float, s_mfu: float, nbytes: float,
           flops: float) -> dict:
    return {"s_mbu": s_mbu, "s_mfu": s_mfu, "achieved_bandwidth_gbs": bw_gbs, "achieved_tflops": tflops,
            "time_s": time_s, "bytes": {"total": nbytes}, "flops": {"total": flops}}


# what the quickstart suite wrote on a 2-thread AMD EPYC (tiny-moe through transformers, batch 1 and 4),
# trimmed to the figures the plots read; the numbers are the records' own
_PEAK = {"kind": "calibrated", "source": "calibrated: copy 512 MiB device-to-device; fp32 matmul 2048^3",
         "device": "AMD EPYC", "devices": 1, "mem_bandwidth_gbs": 34.15616217642409, "compute_dtype": "float32",
         "tflops": 0.19131581913146667}
_REAL = {
    1: ("tiny-moe__hf__random-in128-out32__bs1__569de21d", 444.4678963002516, 0.14383423785994462,
        _phase(0.4080402139203545, 0.016177251961875166, 0.05629437299648998, 0.01194631328346367,
               0.08455783758664843, 22970368.0, 910688256.0),
        _phase(0.8735818449683205, 0.0004726915462499816, 0.5093099250661908, 0.025576112458304833,
               0.0024707394735882333, 444923904.0, 240746496.0)),
    4: ("tiny-moe__hf__random-in128-out32__bs4__0e9b2040", 1304.4359197999652, 0.04900946083067323,
        _phase(0.2386822368598259, 0.03267712673304572, 0.027869288001966197, 0.006987970007490293,
               0.17080201146665738, 6651904.0, 910688256.0),
        _phase(1.0345081465162418, 0.0014514525642041112, 0.16586590697988868, 0.030287599091864584,
               0.007586683478623977, 171589632.0, 240746496.0)),
}
_QUALITY = {"perplexity": {"tiny-c": {"perplexity": 29.235800454027185, "windows": 15, "context_length": 512}},
            "lm_eval": {"tasks": {t: {"metrics": {"acc": {"value": v, "stderr": 0.036}},
                                      "n_samples": {"effective": 100}, "num_fewshot": 0,
                                      "higher_is_better": {"acc": True}}
                                  for t, v in (("moecap_real_c", 0.73), ("moecap_real_code", 0.85),
                                               ("moecap_real_prose", 0.84))}}}


def _config(bs: int | None) -> dict:
    return {"model": {"id": "tiny-moe", "display_name": "tiny-moe"},
            "runner": {"type": "hf", "name": "hf", "display_name": "hf", "device": "cpu", "dtype": "float32",
                       "attn_implementation": "sdpa"},
            "workload": {"name": "quality" if bs is None else "random-in128-out32"},
            "load": None if bs is None else {"batch_size": bs, "kind": "batch"},
            "hardware": {"detected": {"accelerator": "cpu", "device_name": "AMD EPYC", "device_count": 1}}}


def _write_excerpts(folder: Path) -> Path:
    out = folder / "quickstart"
    out.mkdir(parents=True)
    for bs, (cell, thr, usd, prefill, decode) in _REAL.items():
        rec = {"schema_version": 2, "run_id": "r", "created_at": f"2026-12-05T06:30:2{bs}+00:00",
               "suite": {"name": "quickstart"}, "cell_id": cell, "status": "ok", "config": _config(bs),
               "report": {"throughput": {"completed": 8, "output_tokens": 256, "output_tokens_per_s": thr},
                          "cost": {"usd_per_1m_output_tokens": usd},
                          "utilization": {"basis": "traced", "prefill": prefill, "decode": decode, "peak": _PEAK},
                          "basis": {"throughput": "measured", "utilization": "traced", "cost": "estimated"}}}
        (out / f"{cell}.json").write_text(json.dumps(rec), encoding="utf-8")
    cell = "tiny-moe__hf__quality__noload__91e65b43"
    rec = {"schema_version": 2, "run_id": "r", "created_at": "2026-12-05T06:30:40+00:00",
           "suite": {"name": "quickstart"}, "cell_id": cell, "status": "ok", "config": _config(None),
           "report": {"quality": _QUALITY, "basis": {"quality": "measured"}}}
    (out / f"{cell}.json").write_text(json.dumps(rec), encoding="utf-8")
    return folder


@pytest.fixture
def real(tmp_path):
    """(frame, {cell_id: record}) of real records: the quickstart excerpts above."""
    folder = _write_excerpts(tmp_path)
    df = merge_quality(load_results(folder))
    records = {}
    for path in df["record_path"].dropna():
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
        records[rec["cell_id"]] = rec
    return df, records


def frame(*rows: dict):
    """A frame of hand-built rows (the data layer's own frame builder, so every column is there)."""
    base = {"model": "m", "hardware": "h", "precision": "p", "load": "bs=1"}
    return _frame([{**base, **r} for r in rows])


def _annotations(fig) -> str:
    return " ".join(a.text for a in fig.layout.annotations)


def _point_traces(fig):
    return [t for t in fig.data if t.customdata is not None]


# ------------------------------------------------------------------------------------------ the figure table


def test_the_roofline_figures_are_in_the_table_and_do_not_gate(real):
    df, records = real
    keys = ("achieved_tflops_decode", "achieved_tflops_prefill", "achieved_bandwidth_gbs_decode",
            "achieved_bandwidth_gbs_prefill", "peak_tflops", "peak_mem_bandwidth_gbs")
    for key in keys:
        f = figures.get(key)
        assert f.family == "utilization" and f.show == () and not f.gated and f.threshold is None, f
    assert figures.get("achieved_tflops_decode").unit == "TFLOP/s"
    assert figures.get("peak_mem_bandwidth_gbs").unit == "GB/s"
    perf = df[df["load"] == "bs=4"].iloc[0]
    util = records[perf["cell_id"]]["report"]["utilization"]
    assert perf["achieved_tflops_decode"] == util["decode"]["achieved_tflops"]
    assert perf["achieved_bandwidth_gbs_prefill"] == util["prefill"]["achieved_bandwidth_gbs"]
    assert perf["peak_tflops"] == util["peak"]["tflops"] and perf["peak_kind"] == "calibrated"
    assert perf["peak_mem_bandwidth_gbs"] == util["peak"]["mem_bandwidth_gbs"]
    assert [peak_kind_label(v) for v in ("calibrated", "datasheet", "user", float("nan"), None)] == \
        ["calibrated", "datasheet", "user", "kind not recorded", "kind not recorded"]


# ------------------------------------------------------------------------------------------ colours


def _colour_of(fig, system: str) -> set[str]:
    """The colours a figure gives ``system``'s traces (markers and lines)."""
    out = set()
    for t in fig.data:
        if t.name == system or str(t.name).startswith(system + " · "):
            for c in (getattr(t.marker, "color", None), getattr(t.line, "color", None)):
                if isinstance(c, str):
                    out.add(c)
    return out


def _three_systems():
    return frame(
        *({"system": s, "cell_id": f"{s}-{i}", "load": f"bs={i}", "batch_size": i,
           "output_tokens_per_s": 10.0 * (k + 1) * i, "usd_per_1m_output_tokens": 1.0 + k + 1 / i,
           "accuracy": 0.5 + 0.1 * k, "s_mbu_decode": 0.1 * i,
           "achieved_tflops_decode": 0.01 * i * (k + 1), "achieved_bandwidth_gbs_decode": 5.0 * i,
           "peak_tflops": 10.0, "peak_mem_bandwidth_gbs": 100.0, "peak_kind": "datasheet"}
          for k, s in enumerate(("alpha", "beta", "gamma")) for i in (1, 2)))


def test_one_colour_per_system_in_every_plot_and_under_any_filter():
    df = _three_systems()
    colors = system_colors(df)
    assert colors == {"alpha": PALETTE[0], "beta": PALETTE[1], "gamma": PALETTE[2]}
    assert system_colors(df.iloc[::-1]) == colors  # order of the rows does not matter
    figs = (scatter_figure(df, "usd_per_1m_output_tokens", "accuracy"), radar_figure(df, None),
            roofline_figure(df))
    for s, c in colors.items():  # default: computed from the frame, the same in all three
        assert all(_colour_of(fig, s) == {c} for fig in figs), s
    # a filter to gamma alone: with the board's colours gamma keeps its colour in every plot
    only = df[df["system"] == "gamma"]
    assert system_colors(only) == {"gamma": PALETTE[0]}  # what a filter would repaint it to
    for fig in (scatter_figure(only, "usd_per_1m_output_tokens", "accuracy", colors=colors),
                radar_figure(only, ["gamma"], colors=colors), roofline_figure(only, colors=colors)):
        assert _colour_of(fig, "gamma") == {PALETTE[2]}
    # a system the given colours lack still gets one (not a KeyError), distinct from the given ones
    fig = scatter_figure(df, "usd_per_1m_output_tokens", "accuracy", colors={"alpha": "#000000"})
    assert _colour_of(fig, "alpha") == {"#000000"} and len(_colour_of(fig, "beta") | _colour_of(fig, "gamma")) == 2


def test_colours_on_real_records_are_shared(real):
    df, _ = real
    colors = system_colors(df)
    system = "hf (attn=sdpa)"
    perf = df[df["load"].notna()]
    figs = (scatter_figure(perf, "output_tokens_per_s", "accuracy", colors=colors),
            radar_figure(perf, None, colors=colors), roofline_figure(perf, colors=colors))
    assert all(_colour_of(fig, system) == {colors[system]} for fig in figs)


# ------------------------------------------------------------------------------------------ scatter


def test_scatter_accuracy_axes_span_0_to_1_and_utilization_reads_in_percent(real):
    df, _ = real
    fig = scatter_figure(df, "usd_per_1m_output_tokens", "accuracy")
    assert tuple(fig.layout.yaxis.range) == (0, 1) and fig.layout.xaxis.range is None
    for key in ("moecap_real_code:acc", "accuracy"):
        fig = scatter_figure(df, key, "output_tokens_per_s")
        assert tuple(fig.layout.xaxis.range) == (0, 1), key
    assert scatter_figure(df, "ppl:tiny-c", "output_tokens_per_s").layout.xaxis.range is None
    # S-MBU is a fraction in the frame, in % on the plot: ticks, axis title, hover
    fig = scatter_figure(df, "output_tokens_per_s", "s_mbu_decode")
    assert "%" in fig.layout.yaxis.tickformat and "(%)" in fig.layout.yaxis.title.text
    assert fig.layout.xaxis.tickformat is None
    row = df[df["load"] == "bs=4"].iloc[0]
    hover = " ".join(fig.data[0].text)
    assert f"S-MBU decode: {100 * row['s_mbu_decode']:.3g}%" in hover
    assert f"{100 * row['s_mbu_decode']:.3g}" == "3.03"  # 0.0303 of the peak, shown as 3.03 %
    # the legend, titled system, lies flat under the plot area, not beside it
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.title.text == "system"
    assert fig.layout.legend.yanchor == "bottom" and fig.layout.legend.y == 0


def test_scatter_dynamic_acc_metrics_only():
    df = frame({"system": "a", "cell_id": "c", "t:acc_norm": 0.4, "t:f1": 0.3, "output_tokens_per_s": 1.0})
    assert tuple(scatter_figure(df, "t:acc_norm", "output_tokens_per_s").layout.xaxis.range) == (0, 1)
    assert scatter_figure(df, "t:f1", "output_tokens_per_s").layout.xaxis.range is None


# ------------------------------------------------------------------------------------------ radar


def _two_configs():
    """System a: a fast row and a cheap (and more accurate) row; b: one row."""
    return frame(
        {"system": "a", "cell_id": "a-fast", "output_tokens_per_s": 100.0, "usd_per_1m_output_tokens": 5.0,
         "accuracy": 0.6},
        {"system": "a", "cell_id": "a-cheap", "output_tokens_per_s": 10.0, "usd_per_1m_output_tokens": 1.0,
         "accuracy": 0.8},
        {"system": "b", "cell_id": "b-only", "output_tokens_per_s": 50.0, "usd_per_1m_output_tokens": 2.0,
         "accuracy": 0.7},
    )


def _traces(fig) -> dict:
    return {t.name: t for t in fig.data}


def test_radar_draws_one_real_configuration_per_system():
    df = _two_configs()
    fig = radar_figure(df, ["a", "b"])  # best_by: output throughput
    t = _traces(fig)
    assert set(t) == {"a", "b"}
    assert set(t["a"].customdata) == {"a-fast"} and set(t["b"].customdata) == {"b-only"}
    assert t["a"].meta["raw"] == {"C": 5.0, "A": 0.6, "P": 100.0}  # all from the fast row, none from the cheap
    assert t["b"].meta["raw"] == {"C": 2.0, "A": 0.7, "P": 50.0}
    assert list(t["a"].theta[:3]) == ["C: cost (lower $ better)", "A: accuracy", "P: output throughput"]
    assert list(t["a"].r) == pytest.approx([2.0 / 5.0, 0.6 / 0.7, 1.0, 2.0 / 5.0])
    assert list(t["b"].r) == pytest.approx([1.0, 1.0, 0.5, 1.0])
    assert "$ 5/1M tok" in t["a"].text and "100 tok/s" in t["a"].text and "accuracy 0.6" in t["a"].text
    assert "%{customdata}" in t["a"].hovertemplate  # the hover names the cell
    assert "best row by Output throughput (tok/s) (highest)" in fig.layout.title.text
    # the cheapest row when the ranking figure is cost (lower is better), the most accurate for accuracy
    for best_by in ("usd_per_1m_output_tokens", "accuracy"):
        fig = radar_figure(df, None, best_by=best_by)
        t = _traces(fig)
        assert set(t["a"].customdata) == {"a-cheap"}, best_by
        assert t["a"].meta["raw"] == {"C": 1.0, "A": 0.8, "P": 10.0}
        assert list(t["a"].r) == pytest.approx([1.0, 1.0, 0.2, 1.0])
    assert "(lowest)" in radar_figure(df, None, best_by="usd_per_1m_output_tokens").layout.title.text


def test_radar_leaves_a_missing_value_out_not_zero():
    df = frame({"system": "a", "cell_id": "a1", "output_tokens_per_s": 100.0, "usd_per_1m_output_tokens": 5.0,
                "accuracy": 0.6},
               {"system": "b", "cell_id": "b1", "output_tokens_per_s": 50.0, "usd_per_1m_output_tokens": 2.0})
    t = _traces(radar_figure(df, None))
    assert "A: accuracy" in t["a"].theta and "A: accuracy" not in t["b"].theta
    assert list(t["b"].theta) == ["C: cost (lower $ better)", "P: output throughput", "C: cost (lower $ better)"]
    assert 0.0 not in list(t["b"].r) and list(t["b"].r) == pytest.approx([1.0, 0.5, 1.0])
    assert t["b"].meta["raw"]["A"] is None
    # no chosen row has an accuracy: A is 1/perplexity, each from its row
    df = frame({"system": "a", "cell_id": "a1", "output_tokens_per_s": 100.0, "perplexity": 8.0},
               {"system": "b", "cell_id": "b1", "output_tokens_per_s": 50.0, "perplexity": 4.0})
    fig = radar_figure(df, None)
    t = _traces(fig)
    assert list(t["a"].theta[:2]) == ["A: 1/perplexity", "P: output throughput"]
    assert list(t["a"].r) == pytest.approx([0.5, 1.0, 0.5]) and "perplexity 8" in t["a"].text
    # every axis stays on the chart, though no system has a cost
    assert list(fig.layout.polar.angularaxis.categoryarray) == \
        ["C: cost (lower $ better)", "A: 1/perplexity", "P: output throughput"]


def test_radar_names_the_systems_it_leaves_out():
    df = frame({"system": "a", "cell_id": "a1", "output_tokens_per_s": 100.0, "usd_per_1m_output_tokens": 5.0},
               {"system": "q", "cell_id": "q1", "accuracy": 0.9})  # a quality-only row: no throughput
    fig = radar_figure(df, None)
    assert [t.name for t in fig.data] == ["a"]
    assert "left out: q (no Output throughput (tok/s))" in fig.layout.title.text
    assert "No shown row has Cost" in _annotations(radar_figure(df[df["system"] == "q"], None,
                                                                best_by="usd_per_1m_output_tokens"))


def test_radar_on_real_records(real):
    df, records = real
    fig = radar_figure(df, None)
    t = _traces(fig)
    assert list(t) == ["hf (attn=sdpa)"]
    (cell,) = set(t["hf (attn=sdpa)"].customdata)
    fastest = max((r for r in records.values() if (r["report"].get("throughput") or {}).get("output_tokens_per_s")),
                  key=lambda r: r["report"]["throughput"]["output_tokens_per_s"])
    assert cell == fastest["cell_id"] and "bs4" in cell
    rep = fastest["report"]
    raw = t["hf (attn=sdpa)"].meta["raw"]
    assert raw["P"] == rep["throughput"]["output_tokens_per_s"]
    assert raw["C"] == rep["cost"]["usd_per_1m_output_tokens"]
    row = df[df["cell_id"] == cell].iloc[0]
    assert raw["A"] == row["accuracy"] and 0 < raw["A"] < 1  # merged from the quality record
    assert list(t["hf (attn=sdpa)"].r) == [1.0, 1.0, 1.0, 1.0]  # the only system: best on every axis
    for s in set(df["system"]) - {"hf (attn=sdpa)"}:  # quality-only systems are named, not drawn at 0
        assert s in fig.layout.title.text


# ------------------------------------------------------------------------------------------ roofline


def test_roofline_points_and_ceilings_come_from_the_records(real):
    df, records = real
    fig = roofline_figure(df)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "FLOP/byte" in fig.layout.xaxis.title.text and "FLOP/s" in fig.layout.yaxis.title.text
    roofs = {t.meta["roof"]: t for t in fig.data if isinstance(t.meta, dict) and "roof" in t.meta}
    assert set(roofs) == {"memory", "compute"}
    peak = next(r["report"]["utilization"]["peak"] for r in records.values()
                if (r["report"].get("utilization") or {}).get("peak"))
    bw, top = peak["mem_bandwidth_gbs"] * 1e9, peak["tflops"] * 1e12
    mem, comp = roofs["memory"], roofs["compute"]
    assert all(y == pytest.approx(bw * x, rel=1e-12) for x, y in zip(mem.x, mem.y))  # peak bandwidth x intensity
    assert list(comp.y) == [top, top]
    assert mem.x[-1] == pytest.approx(top / bw) == comp.x[0]  # they meet at the ridge
    assert f"{peak['mem_bandwidth_gbs']:.4g} GB/s ({peak['kind']})" in mem.name
    assert f"{peak['tflops']:.4g} TFLOP/s ({peak['kind']})" in comp.name and peak["kind"] == "calibrated"
    assert "(calibrated)" in _annotations(fig)
    points = _point_traces(fig)
    seen = set()
    for t in points:
        phase = t.name.rsplit(" · ", 1)[1]
        assert t.marker.symbol == {"decode": "circle", "prefill": "diamond"}[phase]
        for cell, x, y in zip(t.customdata, t.x, t.y):
            util = records[cell]["report"]["utilization"][phase]
            assert y == util["achieved_tflops"] * 1e12
            assert x == pytest.approx(util["achieved_tflops"] * 1e12 / (util["achieved_bandwidth_gbs"] * 1e9),
                                      rel=1e-12)
            assert x == pytest.approx(util["flops"]["total"] / util["bytes"]["total"], rel=1e-9)  # FLOP per byte
            assert y <= min(bw * x, top)  # under the roof
            seen.add((cell, phase))
    perf = {c for c, r in records.items() if (r["report"].get("utilization") or {}).get("decode")}
    assert len(perf) >= 2 and seen == {(c, p) for c in perf for p in ("decode", "prefill")}
    # the hover: S-MBU and S-MFU in %
    bs4 = next(c for c in perf if "bs4" in c)
    decode = next(t for t in points if t.name.endswith("decode"))
    hover = decode.text[list(decode.customdata).index(bs4)]
    u = records[bs4]["report"]["utilization"]["decode"]
    assert f"S-MBU decode: {100 * u['s_mbu']:.3g}%" in hover and f"S-MFU decode: {100 * u['s_mfu']:.3g}%" in hover


def test_roofline_one_set_of_ceilings_per_peak_labelled_by_kind():
    df = frame(
        {"system": "vllm", "hardware": "NVIDIA H100", "cell_id": "g1", "batch_size": 1,
         "achieved_tflops_decode": 20.0, "achieved_bandwidth_gbs_decode": 2000.0,
         "achieved_tflops_prefill": 500.0, "achieved_bandwidth_gbs_prefill": 1000.0,
         "s_mbu_decode": 0.6, "s_mfu_decode": 0.02,
         "peak_tflops": 989.4, "peak_mem_bandwidth_gbs": 3350.0, "peak_kind": "datasheet"},
        {"system": "vllm", "hardware": "NVIDIA H100", "cell_id": "g8", "batch_size": 8,
         "achieved_tflops_decode": 120.0, "achieved_bandwidth_gbs_decode": 2400.0,
         "peak_tflops": 989.4, "peak_mem_bandwidth_gbs": 3350.0, "peak_kind": "datasheet"},
        {"system": "hf", "hardware": "AMD EPYC", "model": "m2", "cell_id": "c1", "batch_size": 1,
         "achieved_tflops_decode": 0.001, "achieved_bandwidth_gbs_decode": 1.0,
         "peak_tflops": 0.19, "peak_mem_bandwidth_gbs": 34.0, "peak_kind": "calibrated"},
        {"system": "hf", "hardware": "odd box", "cell_id": "u1", "batch_size": 1,
         "achieved_tflops_decode": 0.002, "achieved_bandwidth_gbs_decode": 1.0,
         "peak_tflops": 1.0, "peak_mem_bandwidth_gbs": 50.0},  # a user's peak: no kind in the frame
        {"system": "hf", "cell_id": "none", "batch_size": 1},  # no attained rates: no point
    )
    fig = roofline_figure(df)
    roofs = [t for t in fig.data if isinstance(t.meta, dict) and "roof" in t.meta]
    names = sorted(t.name for t in roofs)
    assert names == sorted([
        "NVIDIA H100: memory roof, 3350 GB/s (datasheet)", "NVIDIA H100: compute roof, 989.4 TFLOP/s (datasheet)",
        "AMD EPYC: memory roof, 34 GB/s (calibrated)", "AMD EPYC: compute roof, 0.19 TFLOP/s (calibrated)",
        "odd box: memory roof, 50 GB/s (kind not recorded)", "odd box: compute roof, 1 TFLOP/s (kind not recorded)"])
    h100 = next(t for t in roofs if t.name.startswith("NVIDIA H100: memory"))
    assert h100.x[-1] == pytest.approx(989.4e12 / 3350e9)  # the ridge
    points = {t.name: t for t in _point_traces(fig)}
    decode = points["vllm · m (NVIDIA H100, p) · decode"]
    assert list(decode.customdata) == ["g1", "g8"]  # joined in batch-size order
    assert list(decode.y) == [20e12, 120e12] and list(decode.x) == pytest.approx([10.0, 50.0])
    assert list(points["vllm · m (NVIDIA H100, p) · prefill"].x) == pytest.approx([500.0])
    assert "S-MBU decode: 60%" in decode.text[0] and "S-MFU decode: 2%" in decode.text[0]
    assert "S-MBU decode: n/a" in decode.text[1]
    # the systems' colours, the models' dashes
    assert decode.line.color == system_colors(df)["vllm"]
    assert points["hf · m2 (AMD EPYC, p) · decode"].line.dash != points["hf · m (odd box, p) · decode"].line.dash
    assert "none" not in {c for t in points.values() for c in t.customdata}


def test_empty_frames_give_the_empty_figure():
    for fn in ALL_FIGURES:
        args = ("usd_per_1m_output_tokens", "accuracy") if fn is scatter_figure else ()
        fig = fn(empty_frame(), *args)
        assert _annotations(fig) == "No rows match the filters." and not fig.data, fn.__name__
    df = frame({"system": "a", "cell_id": "a1", "output_tokens_per_s": 1.0, "s_mbu_decode": 0.5})
    assert _annotations(roofline_figure(df)) == "No row has attained FLOP/s and bytes/s."
    zero = frame({"system": "a", "cell_id": "a1", "achieved_tflops_decode": 0.0, "achieved_bandwidth_gbs_decode": 1.0})
    assert _annotations(roofline_figure(zero)) == "No row has attained FLOP/s and bytes/s."  # no log of 0
    assert _annotations(radar_figure(_two_configs(), [])) == "Pick at least one system."
