"""The moecap leaderboard: a Gradio app over a folder (or Hugging Face dataset) of result records.

Tabs:

* **Leaderboard**: the table, ranked best first on a chosen figure (default: output throughput)
  with a rank column; rank, model and system pinned, then cost, accuracy, perplexity and throughput;
  a column picker; CSV export of the shown rows on request. Above the tabs a search box and the
  filters (collapsed); a selection that allows nothing shows no rows and says so;
* **CAP trade-offs**: two scatter plots of any two metrics with the Pareto front, and a
  radar chart of cost / accuracy / performance normalised across the shown rows;
* **Roofline**: S-MBU and S-MFU (decode and prefill) per batch size;
* **About**: every figure's definition, unit and direction (from the figure table), how results are
  produced and submitted, the newest record's time, how to cite;
* **Record**: one record's config, environment and report, with its bytes by component and
  its latency distribution.

``build_app(results)`` returns the ``gr.Blocks``; ``launch(...)`` serves it.
Named endpoints (for ``gradio_client``): ``/filter_table``, ``/export_csv``, ``/cap_plot``,
``/cap_plot_2``, ``/radar``, ``/roofline``, ``/record``.
"""

from __future__ import annotations

import atexit
import inspect
import numbers
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from moecap.leaderboard.data import (
    MERGED,
    SET_OF,
    column,
    columns,
    columns_for,
    display_frame,
    filter_frame,
    load_results,
    merge_quality,
    to_csv,
)
from moecap.leaderboard.plots import (
    _empty_fig,
    _hib,
    _label,
    _num,
    bytes_figure,
    latency_figure,
    radar_figure,
    roofline_figure,
    scatter_figure,
    system_colors,
)

log = logging.getLogger(__name__)

RANK = "#"  # the rank column's header
# the ranking's default figure: the first of these with values (P, then C, then A)
RANK_DEFAULTS = ("output_tokens_per_s", "usd_per_1m_output_tokens", "accuracy", "perplexity")
# the table's leading columns, in this order when shown: who, then C, A, P, then the setting
HEADLINE_ORDER = ("model", "system", "usd_per_1m_output_tokens", "accuracy", "perplexity",
                  "output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "load", "precision", "hardware")
PINNED = 3  # rank, model, system stay in view when the table scrolls sideways
PHONE_WIDTH = 700  # below this viewport width (px) the table starts compact: who, then C, A, P
PHONE_KEYS = ("model", "system", "usd_per_1m_output_tokens", "accuracy", "output_tokens_per_s")
# small screens: smaller table text and controls (a <style> in the page: gradio 6 takes css= only at launch)
PHONE_CSS = """<style>
@media (max-width: {w}px) {
  .gradio-container, .gradio-container .app, .gradio-container main.contain {
    padding-left: 4px !important; padding-right: 4px !important; }
  #header-md p { font-size: 12px; }
  #leaderboard-table, #leaderboard-table [role=gridcell], #leaderboard-table [role=gridcell] *,
  #leaderboard-table th, #leaderboard-table th * { font-size: 11px !important; }
  #leaderboard-table [role=gridcell], #leaderboard-table th, #leaderboard-table .cell-wrap {
    padding: 3px 2px !important; }
  #leaderboard-table th, #leaderboard-table th *, #leaderboard-table [role=gridcell],
  #leaderboard-table [role=gridcell] * {
    white-space: normal !important; word-break: normal !important; overflow-wrap: break-word !important;
    text-overflow: clip !important; }
  #export-csv { font-size: 13px; }
}
</style>"""
NO_ROWS = "**No rows match the filters and search.** Tick more values under Filters or clear the search."
EXPORTS_KEPT = 8  # CSV exports kept in the app's one export folder (older ones are deleted)
RELOAD_S = 300.0  # records are re-read when older than this (and on a page load after PAGE_RELOAD_S)
PAGE_RELOAD_S = 10.0
# the filters: (column key, label, keyword of filter_frame)
FILTERS = [
    ("system", "System", "systems"),
    ("model", "Model", "models"),
    ("hardware", "Hardware", "hardware"),
    ("precision", "Precision", "precisions"),
    ("workload", "Workload", "workloads"),
    ("load", "Load", "loads"),
    ("ppl_set", "PPL set", "ppl_sets"),
    ("acc_set", "Accuracy set", "acc_sets"),
]
FILTER_ARGS = (*(key for key, _l, _k in FILTERS), "search")  # the handlers' filter arguments, in order
URL_RANK = "rank"  # query parameters of the page's state: these, "q" (search) and each filter's key
URL_SEARCH = "q"


def _named(*names: str):
    """Give a handler taking ``*args`` the argument names of its inputs (Gradio's API names them
    from the signature)."""
    def wrap(fn):
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        return fn
    return wrap


# --------------------------------------------------------------------------------------------
# data helpers


def _load(results: str) -> tuple[pd.DataFrame, str | None]:
    """The merged frame, and a message when there is nothing to show."""
    try:
        df = load_results(results)
    except Exception as err:  # a missing folder, an unreachable dataset: say so, do not crash
        log.warning("could not load results from %s: %s", results, err)
        return pd.DataFrame(columns=[c.key for c in columns()]), (
            f"Could not load results from `{results}`: {err}"
        )
    if df is None or len(df) == 0:
        return pd.DataFrame(columns=[c.key for c in columns()]), (
            f"No result records found in `{results}`. Run a suite first, e.g. "
            f"`moecap run quickstart -o {results}`."
        )
    df = merge_quality(df)
    for c in columns():  # every known column exists, so the handlers need no guards
        if c.key not in df.columns:
            df[c.key] = pd.Series([None] * len(df), index=df.index, dtype="object")
    return df.reset_index(drop=True), None


def _choices(df: pd.DataFrame, key: str) -> list[str]:
    if key not in df.columns:
        return []
    vals = df[key].dropna()
    if key == "load" and "batch_size" in df.columns:
        # order loads by batch size (bs=2 before bs=16), then by name
        order = (
            df.dropna(subset=["load"])
            .assign(_bs=pd.to_numeric(df["batch_size"], errors="coerce"))
            .sort_values(["_bs", "load"], na_position="last")["load"]
            .astype(str)
        )
        return list(dict.fromkeys(order))
    return sorted({str(v) for v in vals})


def _numeric_keys(df: pd.DataFrame) -> list[str]:
    return [c.key for c in columns_for(df) if c.dtype in ("float", "int")]


def _has_values(df: pd.DataFrame, key: str) -> bool:
    return bool(_num(df, key).notna().any())


def _header(results: str, n_rows: int) -> str:
    return ("# moecap leaderboard\nCost / Accuracy / Performance of Mixture-of-Experts LLM serving. "
            f"Results: `{results}` ({n_rows} records).")


def _filter(df: pd.DataFrame, selections: list[list[str] | None], search: str | None,
            known: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """``known``: each filter's values as the page was given them; a selection holding all of them is
    no filter, so rows with values published since (or none, e.g. quality rows) are shown too."""
    kwargs: dict[str, Any] = {}
    for (key, _label_, kw), sel in zip(FILTERS, selections):
        if sel is None:
            continue
        if isinstance(sel, str):
            sel = [sel]
        offered = known[key] if known is not None and key in known else _choices(df, key)
        if set(map(str, sel)) >= set(offered):
            continue  # everything ticked: no filter (keeps rows without a value, e.g. quality rows)
        kwargs[kw] = list(sel)
    return filter_frame(df, search=(search or None), **kwargs)


def _same(values: Any) -> list[str | None]:
    """Values as the browser and pandas both spell them (5 == 5.0, null == NA)."""
    out: list[str | None] = []
    for v in values:
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            out.append(None)
        elif isinstance(v, numbers.Number) and not isinstance(v, bool):
            out.append(repr(float(v)))
        else:
            out.append(str(v))
    return out


def find_row(shown: pd.DataFrame, row_value: Any) -> int | None:
    """The position in ``shown`` (the table as sent) of the row whose values the browser reported
    (``SelectData.row_value``), or None."""
    if not isinstance(row_value, (list, tuple)):
        return None
    want = _same(row_value)
    return next((i for i, values in enumerate(shown.itertuples(index=False)) if _same(values) == want), None)


def rank_frame(frame: pd.DataFrame, key: str | None) -> tuple[pd.DataFrame, str | None]:
    """``frame`` best first on ``key`` with the rank column (1 = best; rows without the figure come
    last, unranked), and a note when some rows were left unranked because they are not comparable.

    A quality figure (Perplexity, Accuracy) is ranked only among rows measured on the same set (its
    ``SET_OF`` column): the set most rows share (then the first by name); rows on other sets follow,
    unranked, and the note says so."""
    if key is None or key not in frame.columns or frame.empty:
        return frame.assign(**{RANK: pd.Series(dtype="Int64")}), None
    values = _num(frame, key)
    comparable = values.notna()
    note = None
    set_key = SET_OF.get(key)
    if set_key in frame.columns:
        sets = frame.loc[comparable, set_key].fillna("(unknown set)").astype(str)
        counts = sets.value_counts()
        if len(counts) > 1:
            main = sorted(counts.index, key=lambda v: (-counts[v], v))[0]
            comparable &= frame[set_key].fillna("(unknown set)").astype(str).eq(main)
            others = int(values.notna().sum() - comparable.sum())
            note = (f"**{_label(key)} is ranked only among rows measured on {main}.** {others} row(s) "
                    f"measured on other sets follow, unranked; pick one set under Filters "
                    f"→ {column(set_key).label}.")
    group = (~comparable).astype(int) + values.isna().astype(int)  # 0 ranked, 1 other set, 2 missing
    out = frame.assign(_g=group, _k=values).sort_values(["_g", "_k"], ascending=[True, not _hib(key)],
                                                        na_position="last", kind="stable")
    ranked = out["_g"].eq(0).to_numpy()
    rank = pd.array([i + 1 if r else None for i, r in enumerate(ranked)], dtype="Int64")
    return out.drop(columns=["_g", "_k"]).assign(**{RANK: rank}), note


def _read_record(row: pd.Series) -> dict[str, Any] | None:
    from moecap.records import migrate

    path = row.get("record_path")
    if isinstance(path, str) and path and Path(path).is_file():
        try:
            return migrate(json.loads(Path(path).read_text(encoding="utf-8")))
        except Exception as err:
            log.warning("cannot read %s: %s", path, err)
    return None


# --------------------------------------------------------------------------------------------
# the app


def _md(text: Any) -> str:
    """Plain text for a Markdown table cell."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def about_markdown(df: pd.DataFrame, results: str) -> str:
    """The About tab: every column's definition, unit and direction (from the figure table), how the
    figures are produced and submitted, the newest record's time, and how to cite."""
    direction = {True: "higher is better", False: "lower is better", None: ""}
    rows = [
        f"| {_md(c.label)} | {_md(c.unit or '')} | {direction[c.higher_is_better]} | {_md(c.description)} |"
        for c in columns_for(df)
    ]
    created = pd.to_datetime(df["created_at"], errors="coerce", utc=True).dropna() \
        if "created_at" in df.columns else pd.Series(dtype="datetime64[ns, UTC]")
    newest = created.max().strftime("%Y-%m-%d %H:%M UTC") if len(created) else "n/a (no records)"
    return "\n".join([
        "## About this leaderboard",
        "",
        "Each row is one benchmark cell: a model served by a system (runner and its settings) on some "
        "hardware with one workload under one load, measured by `moecap run` and written as one validated "
        "JSON record. Quality cells (perplexity, lm-eval accuracy) are merged onto the performance rows of "
        "the same model, system, precision and hardware (the Quality cell column names the record), and "
        "are listed apart only where no performance row matches. S-MBU and S-MFU count only the bytes and "
        "FLOPs of the experts each forward pass really activated (sparse model-bandwidth / model-FLOPs "
        "utilisation), shown in %.",
        "",
        f"**Results:** `{results}`; {len(df)} records; newest record written {newest}. The board re-reads "
        "them every few minutes and on a page load, so published results appear without a restart.",
        "",
        "**Submitting results:** run a suite (`moecap run SUITE`), then `moecap publish results/SUITE --to "
        "hf://datasets/<org>/<name>`; this board reads that dataset. Records are validated on publish.",
        "",
        "**Ranking:** the # column ranks the shown rows on the figure chosen under *Rank by* (best first; "
        "which way is better comes from the figure's definition). Perplexity and accuracy are ranked only "
        "among rows measured on the same set (PPL set, Accuracy set: data, windows or samples, shots); "
        "the others follow unranked and a note says so. The page's address keeps the ranking, search and "
        "filters, so a view can be shared.",
        "",
        "**The Basis column** says how the figures that are not plainly measured were got: utilisation "
        "`traced` (per-pass timings and router traces), `recorded` (the server's own routing record) or "
        "`estimated` (a server's passes reconstructed from streamed timestamps), over a `calibrated` "
        "(measured on the machine), `datasheet` or `user` peak; `cost=estimated` with the power it "
        "assumed (measured, or rated TDP) and where the prices came from (moecap's catalog, or the "
        "user's own). **n/a (why)** marks a figure a record does not have, with the reason (no power "
        "meter, a quality-only run, no quality run, a failed cell).",
        "",
        "**CSV export** holds the shown rows and columns at full precision under the figures' keys; "
        "utilisations there are fractions (0-1), as in the records.",
        "",
        "### Figures",
        "",
        "| Figure | Unit | Direction | Definition |",
        "|---|---|---|---|",
        *rows,
        "",
        "### How to cite",
        "",
        "moecap: a Cost / Accuracy / Performance benchmark for Mixture-of-Experts LLM serving. "
        "Cite the record files you use (their `cell_id` and `created_at`) and the moecap version they name.",
    ])


class _Records:
    """The records behind the board, re-read when older than ``reload_s`` so that results published
    after the app started appear without a restart (a failed re-read keeps the last good frame)."""

    def __init__(self, results: str, reload_s: float | None):
        self.results, self.reload_s = results, reload_s
        self.df, self.message = _load(results)
        self.loaded = time.monotonic()
        self._lock = threading.Lock()

    def frame(self, max_age: float | None = None) -> pd.DataFrame:
        age = self.reload_s if max_age is None else max_age
        if age is not None and time.monotonic() - self.loaded >= age:
            with self._lock:
                if time.monotonic() - self.loaded >= age:
                    df, message = _load(self.results)
                    if message is None or self.df.empty:
                        self.df, self.message = df, message
                    self.loaded = time.monotonic()
        return self.df


def _record_choices(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, cell id) of every record, for the record picker: what the record is (model, system,
    precision, workload, load, and hardware when the records have several), its suite, and the end of
    its cell id (which tells apart records of the same setting)."""
    several_hw = df["hardware"].nunique() > 1 if "hardware" in df.columns else False
    out = []
    for _, r in df.iterrows():
        if pd.isna(r.get("cell_id")):
            continue
        cell = str(r["cell_id"])
        keys = ("model", "system", "precision", "workload", "load") + (("hardware",) if several_hw else ())
        what = " · ".join(str(r[k]) for k in keys if k in r and isinstance(r[k], str) and r[k])
        suite = f" [{r['suite']}]" if isinstance(r.get("suite"), str) else ""
        out.append((f"{what or cell}{suite} …{cell[-8:]}", cell))
    return out


TOOLTIP_JS = """(tips) => {
  const norm = (t) => (t || '').replace(/\\s+/g, ' ').trim();
  const apply = () => document.querySelectorAll('#leaderboard-table th').forEach((th) => {
    const tip = tips[norm(th.innerText)];
    if (tip && th.title !== tip) th.title = tip;
  });
  if (!window.__moecapTips) {
    window.__moecapTips = new MutationObserver(apply);
    window.__moecapTips.observe(document.body, {subtree: true, childList: true});
  }
  apply();
  return [];
}"""
URL_JS = """(query) => {
  const url = location.pathname + (query ? '?' + query : '') + location.hash;
  if (url !== location.pathname + location.search + location.hash) history.replaceState(null, '', url);
  return [];
}"""


def build_app(results: str, reload_s: float | None = None) -> gr.Blocks:
    """The leaderboard over ``results`` (a folder of records, or ``hf://datasets/org/name``), re-read
    every ``reload_s`` seconds (default ``$MOECAP_LEADERBOARD_RELOAD_S`` or 300; a negative value:
    never) and on a page load when older than 10 s."""
    if reload_s is None:
        reload_s = float(os.environ.get("MOECAP_LEADERBOARD_RELOAD_S", RELOAD_S))
    data = _Records(str(results), reload_s if reload_s >= 0 else None)
    df, message = data.df, data.message
    all_columns = columns_for(df)
    numeric = _numeric_keys(df)
    label_to_key = {c.header: c.key for c in all_columns}
    picker_labels = [c.header for c in all_columns]
    default_labels = [c.header for c in all_columns if c.default_visible]
    sortable = [_label(k) for k in numeric]
    axis_choices = [(_label(k), k) for k in numeric]
    tips = {c.header: f"{c.description}" + (f" ({'higher' if c.higher_is_better else 'lower'} is better)"
                                            if c.higher_is_better is not None else "")
            for c in all_columns}
    tips[RANK] = "Rank on the figure chosen under Rank by (1 = best); rows that cannot be compared are unranked"

    def pick_default(*candidates: str) -> str | None:
        for k in candidates:
            if k in numeric and _has_values(df, k):
                return k
        for k in candidates:
            if k in numeric:
                return k
        return numeric[0] if numeric else None

    cap_x = pick_default("usd_per_1m_output_tokens", "j_per_token", "output_tokens_per_s")
    cap_y = pick_default("accuracy", "perplexity")
    cap2_x = pick_default("output_tokens_per_s", "requests_per_s")
    cap2_y = pick_default("perplexity", "accuracy")
    rank_default = pick_default(*RANK_DEFAULTS)
    records = _record_choices(df)
    all_systems = _choices(df, "system")
    known = {key: _choices(df, key) for key, _l, _k in FILTERS}  # filter values the pages were given

    # ---- handlers (closures over the loaded records) ------------------------------------------
    # every handler takes the filters and the search first (FILTER_ARGS), then its own inputs

    def _filtered(sel) -> pd.DataFrame:
        """The rows the filters and search allow; quality rows merged onto performance rows are shown
        there, not twice."""
        frame = data.frame()
        if frame.empty:
            return frame
        if MERGED in frame.columns:
            frame = frame[~frame[MERGED].fillna(False).astype(bool)]
        return _filter(frame, list(sel[: len(FILTERS)]), sel[len(FILTERS)], known)

    def _rank_key(rank_by: str | None) -> str | None:
        return label_to_key.get(rank_by or "") or rank_default

    def _ranked(sel, rank_by: str | None) -> tuple[pd.DataFrame, str | None]:
        return rank_frame(_filtered(sel), _rank_key(rank_by))

    def _keys(labels: list[str] | None) -> list[str]:
        keys = [label_to_key[lb] for lb in (labels or []) if lb in label_to_key]
        keys = keys or [label_to_key[lb] for lb in default_labels]
        lead = [k for k in HEADLINE_ORDER if k in keys]
        return lead + [k for k in keys if k not in lead]

    @_named(*FILTER_ARGS[:-1])
    def refresh(*args):
        """On a page load and every ``reload_s``: re-read the records if stale; new filter values are
        added to the filters ticked (what a visitor had unticked stays unticked)."""
        frame = data.frame(max_age=PAGE_RELOAD_S if data.reload_s is not None else None)
        updates = []
        for (key, _label_, _kw), sel in zip(FILTERS, args):
            now = _choices(frame, key)
            sel = [sel] if isinstance(sel, str) else list(sel or [])
            new = [v for v in now if v not in known[key]]
            known[key] = now
            updates.append(gr.update(choices=now, value=[v for v in now if v in sel or v in new]) if new
                           else gr.update(choices=now))
        return (*updates, gr.update(choices=_record_choices(frame)), _header(str(results), len(frame)))

    def from_url(request: gr.Request):
        """The page's state from its address: ``?rank=<figure>&q=<search>&<filter key>=<value>...``
        (a filter named there allows only the values named; unknown values are ignored)."""
        params = getattr(request, "query_params", None) if request is not None else None
        get = (lambda k: params.getlist(k)) if params is not None and hasattr(params, "getlist") else (lambda k: [])
        updates = []
        for key, _label_, _kw in FILTERS:
            asked = [v for v in get(key) if v in known[key]]
            updates.append(gr.update(value=asked) if get(key) else gr.update())
        q = get(URL_SEARCH)
        rank = [r for r in get(URL_RANK) if r in sortable or r in numeric]  # a figure's label or key
        rank_update = gr.update(value=rank[0] if rank[0] in sortable else _label(rank[0])) if rank else gr.update()
        return (*updates, gr.update(value=q[0]) if q else gr.update(), rank_update)

    @_named(*FILTER_ARGS, "sort_by")
    def url_state(*args) -> str:
        """The query string of the page's state (filters that allow everything are left out)."""
        from urllib.parse import urlencode

        pairs: list[tuple[str, str]] = []
        for (key, _label_, _kw), sel in zip(FILTERS, args):
            sel = [sel] if isinstance(sel, str) else list(sel or [])
            if set(sel) != set(known[key]):
                pairs += [(key, v) for v in sel] or [(key, "")]
        search, sort_by = args[len(FILTERS)], args[len(FILTERS) + 1]
        if search:
            pairs.append((URL_SEARCH, search))
        key = _rank_key(sort_by)
        if key and key != rank_default:
            pairs.append((URL_RANK, key))
        return urlencode(pairs)

    @_named(*FILTER_ARGS, "columns", "sort_by", "compact")
    def filter_table(*args):
        """The table; ``compact`` (a state the page sets on a phone, not an API parameter): bare n/a
        and no standard errors, so the narrow columns hold whole values."""
        sel, labels, sort_by, is_compact = args[:-3], args[-3], args[-2], args[-1]
        frame, _note = _ranked(sel, sort_by)
        shown = display_frame(frame, keys=_keys(labels), compact=bool(is_compact))
        shown.insert(0, RANK, frame[RANK].to_numpy() if RANK in frame.columns else None)
        return shown

    @_named(*FILTER_ARGS, "sort_by")
    def rank_note(*args):
        _frame, note = _ranked(args[:-1], args[-1])
        return gr.update(value=note or "", visible=bool(note))

    def compact(width: float | None):
        """On a narrow screen: the compact columns (rank, model, system, C, A, P), wrapped cells,
        only the rank pinned; the Columns picker still offers every column."""
        if not width or width >= PHONE_WIDTH:
            return gr.update(), gr.update(), False
        keys = [k for k in PHONE_KEYS if _label(k) in picker_labels]
        # fixed shares of the screen: names get more room, figures the same each; values wrap at spaces
        share = {"model": 21, "system": 21}
        rest = (93 - sum(share.get(k, 0) for k in keys)) / max(1, sum(k not in share for k in keys))
        widths = ["7%", *(f"{share.get(k, rest):.0f}%" for k in keys)]
        return (gr.update(value=[_label(k) for k in keys]),
                gr.update(pinned_columns=1, wrap=True, column_widths=widths), True)

    @_named(*FILTER_ARGS)
    def no_rows(*args):
        empty = not data.frame().empty and _filtered(args).empty
        return gr.update(visible=empty)

    export_dir: list[Path] = []  # the app's one export folder, made on the first export

    @_named(*FILTER_ARGS, "columns", "sort_by")
    def export_csv(*args):
        """The shown rows (ranked, every shown column at full precision) as CSV, written only when
        asked, into the app's one export folder; older exports beyond ``EXPORTS_KEPT`` are deleted."""
        sel, labels, sort_by = args[:-2], args[-2], args[-1]
        frame, _note = _ranked(sel, sort_by)
        keys = [k for k in _keys(labels) if k in frame.columns]
        if not export_dir:
            export_dir.append(Path(tempfile.mkdtemp(prefix="moecap-leaderboard-exports-")))
            atexit.register(shutil.rmtree, export_dir[0], True)
        folder = export_dir[0]
        old = sorted(folder.glob("*.csv"), key=lambda p: p.stat().st_mtime)
        for stale in old[: max(0, len(old) - EXPORTS_KEPT + 1)]:
            stale.unlink(missing_ok=True)
        path = folder / f"moecap-leaderboard-{uuid.uuid4().hex[:8]}.csv"
        path.write_text(to_csv(frame[[RANK, *keys]] if keys else frame), encoding="utf-8")
        return str(path)

    @_named(*FILTER_ARGS, "x", "y")
    def cap_plot(*args):
        x, y = args[-2], args[-1]
        if not x or not y:
            return _empty_fig("Pick two axes.")
        return scatter_figure(_filtered(args[:-2]), x, y, colors=system_colors(data.frame()))

    @_named(*FILTER_ARGS, "systems", "best_by")
    def radar(*args):
        systems, best_by = args[-2], args[-1]
        return radar_figure(_filtered(args[:-2]), systems, best_by=_rank_key(best_by) or "output_tokens_per_s",
                            colors=system_colors(data.frame()))

    @_named(*FILTER_ARGS)
    def roofline(*args):
        return roofline_figure(_filtered(args), colors=system_colors(data.frame()))

    def record(cell_id: str | None):
        frame = data.frame()
        hits = frame.index[frame["cell_id"].astype(str) == str(cell_id)] if cell_id is not None and \
            "cell_id" in frame.columns else []
        if len(hits) == 0:
            empty = _empty_fig("Pick a record.")
            return {}, empty, empty
        row = frame.loc[hits[0]]
        rec = _read_record(row)
        if rec is None:
            shown = {k: (None if not isinstance(v, (list, dict)) and pd.isna(v) else v) for k, v in row.items()
                     if not isinstance(v, (list, dict))}
            return ({"note": "the record file is not readable here; its table row:",
                     "row": json.loads(json.dumps(shown, default=str))},
                    _empty_fig("Record file not available."), _empty_fig("Record file not available."))
        shown = {k: rec.get(k) for k in ("cell_id", "status", "error", "suite", "config",
                                         "environment", "report") if k in rec}
        return shown, bytes_figure(rec), latency_figure(rec)

    def open_record(evt: gr.SelectData, *args):
        """A click on a table row opens its record in the Record tab. The row is found by its shown
        values (the table's own header menu may have re-sorted the view), else by its position."""
        sel, labels, sort_by, is_compact = args[:-3], args[-3], args[-2], args[-1]
        frame, _note = _ranked(sel, sort_by)
        shown = filter_table(*sel, labels, sort_by, is_compact)
        row = find_row(shown, evt.row_value)
        if row is None:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(frame):
            return gr.update(), gr.update()
        return gr.update(value=str(frame.iloc[row]["cell_id"])), gr.Tabs(selected="record")

    # ---- layout ------------------------------------------------------------------------------

    with gr.Blocks(title="moecap leaderboard", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:  # gradio's copies of exports: cleaned hourly
        gr.HTML(PHONE_CSS.replace("{w}", str(PHONE_WIDTH)), visible=True, padding=False, elem_id="phone-css")
        header_md = gr.Markdown(_header(str(results), len(df)), elem_id="header-md")
        if message:
            gr.Markdown(f"**{message}**", elem_id="empty-message")

        with gr.Row(equal_height=True, elem_id="filter-bar"):
            search = gr.Textbox(value="", show_label=False, placeholder="Search model, system, cell id ...",
                                elem_id="search", scale=3, min_width=160)
            with gr.Accordion("Filters", open=False, elem_id="filters"):
                with gr.Row():
                    filters = []
                    for key, label, _kw in FILTERS:
                        choices = _choices(df, key)
                        comp = gr.CheckboxGroup(choices=choices, value=choices, label=label,
                                                elem_id=f"filter-{key}", show_select_all=True) \
                            if len(choices) <= 6 and max((len(c) for c in choices), default=0) <= 40 else \
                            gr.Dropdown(choices=choices, value=choices, multiselect=True, label=label,
                                        elem_id=f"filter-{key}")
                        filters.append(comp)
        filter_inputs = [*filters, search]

        with gr.Tabs() as tabs:
            with gr.Tab("Leaderboard", id="leaderboard"):
                with gr.Row(equal_height=True):
                    sort_by = gr.Dropdown(choices=sortable, value=_label(rank_default) if rank_default else None,
                                          label="Rank by (best first)", scale=2, min_width=160,
                                          elem_id="rank-by")
                    export = gr.Button("Export CSV", scale=0, min_width=120, elem_id="export-csv")
                export_file = gr.File(label="CSV export", visible=False, elem_id="export-file")
                empty_note = gr.Markdown(NO_ROWS, visible=False, elem_id="no-rows")
                note = gr.Markdown("", visible=False, elem_id="rank-note")
                table = gr.Dataframe(
                    value=None, interactive=False, wrap=False, max_height=640, elem_id="leaderboard-table",
                    pinned_columns=PINNED, show_label=False,
                )
                gr.Markdown("Click a row to open its record. Hover a header for its definition; "
                            "the About tab defines every column.", elem_id="table-hint")
                with gr.Accordion("Columns", open=False):
                    columns = gr.CheckboxGroup(choices=picker_labels, value=default_labels,
                                               label="Shown columns", elem_id="columns")
            with gr.Tab("CAP trade-offs", id="cap"):
                with gr.Row():
                    with gr.Column(min_width=340):
                        with gr.Row():
                            x1 = gr.Dropdown(choices=axis_choices, value=cap_x, label="x axis")
                            y1 = gr.Dropdown(choices=axis_choices, value=cap_y, label="y axis")
                        plot1 = gr.Plot(label="Trade-off", elem_id="cap-plot-1")
                    with gr.Column(min_width=340):
                        with gr.Row():
                            x2 = gr.Dropdown(choices=axis_choices, value=cap2_x, label="x axis")
                            y2 = gr.Dropdown(choices=axis_choices, value=cap2_y, label="y axis")
                        plot2 = gr.Plot(label="Trade-off", elem_id="cap-plot-2")
                gr.Markdown(
                    "Larger outlined diamonds joined by the dotted step line are the Pareto front "
                    "of the shown rows (no other row is at least as good on both axes and better "
                    "on one); which way is better comes from each metric's definition. Each system "
                    "has one colour in every plot."
                )
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        radar_systems = gr.CheckboxGroup(choices=all_systems, value=all_systems,
                                                         label="Systems on the radar")
                        radar_by = gr.Dropdown(choices=sortable,
                                               value=_label(rank_default) if rank_default else None,
                                               label="Each system's configuration: its best on",
                                               elem_id="radar-by")
                        gr.Markdown(
                            "Radar: one real configuration (one record) per system, the system's best "
                            "row on the figure above; its **C** (cost, $ per 1M tokens, lower is "
                            "better), **A** (accuracy; 1/perplexity when no row has accuracy) and "
                            "**P** (output tokens/s), normalised across the drawn rows: 1 is the best "
                            "drawn value (for cost, best/value; otherwise value/best). A figure the "
                            "record lacks is left out, not drawn as 0."
                        )
                    with gr.Column(scale=2, min_width=340):
                        radar_plot = gr.Plot(label="C / A / P", elem_id="radar-plot")
            with gr.Tab("Roofline", id="roofline"):
                gr.Markdown(
                    "Each record's forward passes (decode, prefill) at their arithmetic intensity "
                    "(FLOPs per byte moved, counting only the experts really activated) and attained "
                    "FLOP/s, under the roofs of the hardware: memory bandwidth x intensity and peak "
                    "FLOP/s (calibrated on the machine, or from the datasheet, as labelled)."
                )
                roof_plot = gr.Plot(label="Roofline", elem_id="roofline-plot")
            with gr.Tab("About", id="about"):
                gr.Markdown(about_markdown(df, str(results)), elem_id="about")
            with gr.Tab("Record", id="record"):
                tps = dict(zip(df["cell_id"].astype(str), _num(df, "output_tokens_per_s"))) \
                    if "cell_id" in df.columns else {}
                perf = [v for _, v in records if pd.notna(tps.get(v))]
                first = perf[0] if perf else (records[0][1] if records else None)
                pick = gr.Dropdown(choices=records, value=first,
                                   label="Cell", elem_id="record-pick")
                with gr.Row():
                    bytes_plot = gr.Plot(label="Bytes by component", elem_id="bytes-plot", min_width=340)
                    lat_plot = gr.Plot(label="Latency", elem_id="latency-plot", min_width=340)
                rec_json = gr.JSON(label="Record (config, environment, report)", open=False)

        viewport = gr.Number(value=None, visible=False, elem_id="viewport-width")
        is_phone = gr.State(False)
        url_query = gr.Textbox(value="", visible=False, elem_id="url-state")
        tip_map = gr.JSON(value=tips, visible=False)
        timer = gr.Timer(data.reload_s if data.reload_s else 3600.0, active=data.reload_s is not None)
        refresh_outputs = [*filters, pick, header_md]
        timer.tick(refresh, filters, refresh_outputs, api_name="refresh")
        table_inputs = [*filter_inputs, columns, sort_by, is_phone]
        filter_triggers = [c.change for c in filters] + [search.change]
        table_triggers = [*filter_triggers, columns.change, sort_by.change]
        gr.on(table_triggers, filter_table, table_inputs, table, api_name="filter_table")
        gr.on([demo.load, *filter_triggers, sort_by.change], rank_note, [*filter_inputs, sort_by], note,
              api_name=False)
        gr.on([*filter_triggers, sort_by.change], url_state, [*filter_inputs, sort_by], url_query,
              api_name=False).then(None, url_query, None, js=URL_JS)
        # one chain, no race: the state in the address, records published since (new filter values
        # ticked), the screen's width (compact columns on a phone), the table, its header tooltips
        demo.load(from_url, None, [*filters, search, sort_by], api_name=False).then(
            refresh, filters, refresh_outputs, api_name=False).then(
            compact, viewport, [columns, table, is_phone], js="(w) => window.innerWidth", api_name=False).then(
            filter_table, table_inputs, table, api_name=False).then(None, tip_map, None, js=TOOLTIP_JS)
        gr.on([demo.load, *filter_triggers], no_rows, filter_inputs, empty_note, api_name=False)
        table.select(open_record, table_inputs, [pick, tabs], api_name=False)
        export.click(export_csv, [*filter_inputs, columns, sort_by], export_file, api_name="export_csv").then(
            lambda: gr.update(visible=True), None, export_file, api_name=False)
        gr.on([demo.load, *filter_triggers, x1.change, y1.change], cap_plot,
              [*filter_inputs, x1, y1], plot1, api_name="cap_plot")
        gr.on([demo.load, *filter_triggers, x2.change, y2.change], cap_plot,
              [*filter_inputs, x2, y2], plot2, api_name="cap_plot_2")
        gr.on([demo.load, *filter_triggers, radar_systems.change, radar_by.change], radar,
              [*filter_inputs, radar_systems, radar_by], radar_plot, api_name="radar")
        gr.on([demo.load, *filter_triggers], roofline, filter_inputs, roof_plot,
              api_name="roofline")
        gr.on([demo.load, pick.change], record, pick, [rec_json, bytes_plot, lat_plot],
              api_name="record")
    return demo


def launch(results: str = "results", host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, **kwargs: Any) -> gr.Blocks:
    """Build and serve the leaderboard; returns the running ``Blocks`` (``.close()`` stops it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(results)
    demo.queue()
    demo.launch(server_name=host, server_port=port, share=share, **kwargs)
    return demo
