"""The Gradio leaderboard, served for real on 127.0.0.1 over real quickstart records: driven
through ``gradio_client`` (filters, search, CSV export) and through a headless Chromium
(the table and a Plotly plot render; screenshots go to ``test-artifacts/``)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("gradio")
pytest.importorskip("plotly")
pytest.importorskip("gradio_client")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SMALL = [
    "--set", "workloads.0.num_prompts=4",
    "--set", "workloads.0.output_tokens=8",
    "--set", "workloads.1.perplexity.max_windows=4",
    "--set", "workloads.1.lm_eval.limit=10",
    "--set", "loads=[{batch_size: 1}, {batch_size: 2}, {batch_size: 4}]",
]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory, tiny_moe_dir):
    """Real records: the quickstart suite (three batch sizes plus the quality cell) on this CPU."""
    out = tmp_path_factory.mktemp("lb-results")
    env = dict(os.environ)  # MOECAP_CACHE_DIR (a tmp dir) and MOECAP_TINY_MOE_PROFILE=test, from conftest
    env["MOECAP_TINY_MOE_PROFILE"] = "test"
    proc = subprocess.run(
        [sys.executable, "-m", "moecap", "run", "quickstart", "-o", str(out), *SMALL],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((out / "quickstart").glob("*.json"))) == 4
    return out


@pytest.fixture(scope="module")
def app_url(results_dir):
    from moecap.leaderboard.app import build_app

    demo = build_app(str(results_dir))
    demo.queue()
    try:
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                    quiet=True, show_error=True)
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def test_table_lists_every_record(client):
    rows = _rows(client.predict(api_name="/filter_table"))
    assert len(rows) == 3  # bs=1, bs=2, bs=4; the quality cell's figures are on them, not a row apart
    assert {r["Model"] for r in rows} == {"tiny-moe"}
    assert sorted(r["Load"] for r in rows) == ["bs=1", "bs=2", "bs=4"]
    assert {r["Workload"] for r in rows} == {"random-in128-out32 (in128-out8)"}  # the name, and what ran
    # quality merged onto the performance rows, accuracy with its standard error
    assert all(r["Perplexity"] and r["Perplexity"] > 1 for r in rows)
    assert all(" ± " in r["Accuracy"] for r in rows)


def test_load_filter(client):
    rows = _rows(client.predict(load=["bs=1"], api_name="/filter_table"))
    assert [r["Load"] for r in rows] == ["bs=1"]
    rows = _rows(client.predict(load=["bs=2", "bs=4"], api_name="/filter_table"))
    assert sorted(r["Load"] for r in rows) == ["bs=2", "bs=4"]


def test_search_and_columns_and_sort(client):
    rows = _rows(client.predict(search="bs4", api_name="/filter_table"))  # matches the cell id
    assert [r["Load"] for r in rows] == ["bs=4"]
    assert _rows(client.predict(search="no-such-thing", api_name="/filter_table")) == []
    table = client.predict(columns=["Model", "Load", "Cost ($/1M tok)"],
                           sort_by="Cost ($/1M tok)", api_name="/filter_table")
    # the rank first, then who, then the headline figures (C), then the setting
    assert table["headers"] == ["#", "Model", "Cost ($/1M tok)", "Load"]
    rows = _rows(table)
    costs = [r["Cost ($/1M tok)"] for r in rows]
    assert len(costs) == 3 and costs == sorted(costs)  # cost: lower is better, best first
    assert [r["#"] for r in rows] == [1, 2, 3]


def test_default_ranking_and_empty_selection(client):
    rows = _rows(client.predict(api_name="/filter_table"))
    # ranked by output throughput by default, best first; the rank is the first column
    # the quickstart runs 5 repetitions: a figure reads "median [lo–hi]", ranked on its median
    tps = [float(str(r["Output throughput (tok/s)"]).split()[0]) for r in rows]
    assert [r["#"] for r in rows] == [1, 2, 3] and tps == sorted(tps, reverse=True)
    assert all("[" in str(r["Output throughput (tok/s)"]) for r in rows)
    # unticking every value of a filter leaves no rows (it used to show them all)
    assert _rows(client.predict(load=[], api_name="/filter_table")) == []


def test_csv_export_holds_the_filtered_rows(client, app_url):
    import tempfile

    exports = lambda: sorted(Path(tempfile.gettempdir()).glob("moecap-leaderboard-exports-*/*.csv"))  # noqa: E731
    before = exports()
    client.predict(load=["bs=2"], api_name="/filter_table")  # filtering writes no file
    assert exports() == before
    path = client.predict(load=["bs=1", "bs=4"], api_name="/export_csv")
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    assert [r["load"] for r in rows] == ["bs=4", "bs=1"]  # ranked, best first
    assert [r["#"] for r in rows] == ["1", "2"]
    assert all(float(r["output_tokens_per_s"]) > 0 for r in rows)
    for _ in range(10):  # one export folder, pruned: at most 8 files however many exports
        client.predict(api_name="/export_csv")
    folders = {p.parent for p in exports()} - {p.parent for p in before}
    assert len(folders) == 1 and len(list(next(iter(folders)).glob("*.csv"))) <= 8


def test_plots_and_record(client, app_url):
    from gradio_client import Client

    for api in ("/cap_plot", "/cap_plot_2", "/radar", "/roofline"):
        fig = client.predict(api_name=api)
        assert fig["type"] == "plotly" and '"data":[{' in fig["plot"], api
    # records hold {"path": ...} dicts that the client would take for files: do not download
    perf_id = next(r["Cell"] for r in _rows(client.predict(columns=["Cell", "Load"], api_name="/filter_table"))
                   if r["Load"])
    rec, bytes_fig, lat_fig = Client(app_url, verbose=False, download_files=False).predict(
        perf_id, api_name="/record")
    assert rec["status"] == "ok" and "utilization" in rec["report"]
    assert "experts" in bytes_fig["plot"] and "TTFT" in lat_fig["plot"]


def test_quality_figures_rank_only_on_one_set():
    import pandas as pd

    from moecap.leaderboard.app import RANK, rank_frame

    frame = pd.DataFrame({
        "cell_id": ["a1", "b", "a2", "none", "a3"],
        "perplexity": [10.0, 5.0, 12.0, None, 11.0],
        "ppl_set": ["c (15 windows)", "c (4 windows)", "c (15 windows)", None, "c (15 windows)"],
        "output_tokens_per_s": [1.0, 3.0, 2.0, 4.0, None],
    })
    ranked, note = rank_frame(frame, "perplexity")
    # the set most rows share is ranked (lower perplexity first); the 4-window row follows unranked,
    # though its perplexity is lowest; the row without perplexity comes last
    assert list(ranked["cell_id"]) == ["a1", "a3", "a2", "b", "none"]
    assert list(ranked[RANK]) == [1, 2, 3, pd.NA, pd.NA]
    assert "c (15 windows)" in note and "1 row(s)" in note
    ranked, note = rank_frame(frame, "output_tokens_per_s")  # not a quality figure: every row with it
    assert list(ranked["cell_id"]) == ["none", "b", "a2", "a1", "a3"] and note is None
    assert list(ranked[RANK])[:4] == [1, 2, 3, 4]
    ranked, note = rank_frame(frame.iloc[[0, 2]], "perplexity")  # one set: no note
    assert note is None and list(ranked[RANK]) == [1, 2]


def test_a_clicked_row_is_found_by_its_values():
    """The table's header menu can re-sort the view in the browser: the clicked row is found by the
    values the browser reports, spelled as JSON spells them."""
    import pandas as pd

    from moecap.leaderboard.app import find_row

    shown = pd.DataFrame({"#": pd.array([1, 2, None], dtype="Int64"), "Model": ["m", "m", "q"],
                          "Output throughput (tok/s)": [20.0, 5.0, float("nan")], "Energy": ["n/a (x)", 0.5, 0.25]})
    assert find_row(shown, [2, "m", 5, 0.5]) == 1  # 5 from JSON is 5.0 in pandas
    assert find_row(shown, [None, "q", None, 0.25]) == 2  # null is NA / NaN
    assert find_row(shown, [1, "m", 20.0, "n/a (x)"]) == 0
    assert find_row(shown, [3, "m", 1.0, 0.5]) is None and find_row(shown, None) is None


def test_scatter_front_and_radar_figures():
    import pandas as pd

    from moecap.leaderboard.plots import radar_figure, scatter_figure

    df = pd.DataFrame({
        "system": ["a", "a", "b", "b"], "model": "m", "hardware": "h", "precision": "p",
        "load": ["bs=1", "bs=2", "bs=1", "bs=2"], "cell_id": list("wxyz"),
        "usd_per_1m_output_tokens": [1.0, 2.0, 3.0, 2.5],  # lower is better
        "accuracy": [0.5, 0.7, 0.9, 0.6],  # higher is better
        "output_tokens_per_s": [10.0, 20.0, 40.0, 5.0],
    })
    fig = scatter_figure(df, "usd_per_1m_output_tokens", "accuracy")
    front = [t for t in fig.data if t.name == "Pareto front"][0]
    assert list(front.x) == [1.0, 2.0, 3.0] and list(front.y) == [0.5, 0.7, 0.9]
    assert front.line.shape == "hv"  # corners at (worse cost, worse accuracy)
    radar = radar_figure(df, ["a", "b"])
    # one configuration per system, its fastest row (x for a, y for b): C, A and P all from that row
    r = {t.name: list(t.r)[:3] for t in radar.data}
    assert r["a"] == pytest.approx([1.0, 0.7 / 0.9, 0.5]) and r["b"] == pytest.approx([2.0 / 3.0, 1.0, 1.0])
    assert {t.name: set(t.customdata) for t in radar.data} == {"a": {"x"}, "b": {"y"}}


def test_names_render_as_text_in_plots():
    """Issue 17: an <a href> in a system name became a live link in a plot legend."""
    import pandas as pd

    from moecap.leaderboard.plots import radar_figure, scatter_figure

    evil = "<a href='http://evil.example'>click</a>"
    df = pd.DataFrame({"system": [evil, "b"], "model": "<b>m</b>", "hardware": "h", "precision": "p",
                       "load": "bs=1", "cell_id": ["c1", "c2"], "usd_per_1m_output_tokens": [1.0, 2.0],
                       "accuracy": [0.5, 0.7], "output_tokens_per_s": [10.0, 20.0]})
    fig = scatter_figure(df, "usd_per_1m_output_tokens", "accuracy")
    names = [t.name for t in fig.data]
    assert "&lt;a href='http://evil.example'&gt;click&lt;/a&gt;" in names and evil not in names
    assert all("<a href" not in str(t.text) and "<b>m</b>" not in str(t.text) for t in fig.data)
    radar = radar_figure(df, [evil, "b"])
    assert evil not in [t.name for t in radar.data]


def test_records_published_after_start_appear_without_restart(results_dir, tmp_path):
    """A record written into the results after the app started shows up in the table and in the
    filters (re-read when older than reload_s; here 0.5 s), with no restart."""
    import json
    import shutil
    import time

    from gradio_client import Client

    from moecap.leaderboard.app import build_app

    live = tmp_path / "live"
    shutil.copytree(results_dir, live)
    demo = build_app(str(live), reload_s=0.5)
    demo.queue()
    try:
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                    quiet=True, show_error=True)
        c = Client(demo.local_url, verbose=False)
        assert len(_rows(c.predict(api_name="/filter_table"))) == 3
        src = next(p for p in sorted((live / "quickstart").glob("*.json")) if "bs1" in p.name)
        rec = json.loads(src.read_text())
        rec["cell_id"] += "-late"
        rec["config"]["model"]["display_name"] = "tiny-moe-late"
        (live / "quickstart" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))
        time.sleep(0.6)
        models = [r["Model"] for r in _rows(c.predict(api_name="/filter_table"))]
        assert len(models) == 4 and "tiny-moe-late" in models
        # a page's filters get the new value, ticked (the other values as the page had them)
        updates = c.predict([], ["tiny-moe"], [], [], [], [], [], [], api_name="/refresh")
        model_filter = updates[1]
        assert model_filter["value"] == ["tiny-moe", "tiny-moe-late"]
    finally:
        demo.close()


def test_about_defines_every_column():
    import pandas as pd

    from moecap.leaderboard.app import about_markdown
    from moecap.leaderboard.data import columns_for

    df = pd.DataFrame({"created_at": ["2026-12-01T10:00:00+00:00", "2026-12-02T11:30:00+00:00"],
                       "ppl:tiny-c": [3.0, 4.0], "moecap_real_c:acc": [0.7, 0.8]})
    text = about_markdown(df, "results")
    for c in columns_for(df):
        assert f"| {c.label} |" in text.replace("\\|", "|"), c.key
    assert "2026-12-02 11:30 UTC" in text and "lower is better" in text
    assert "&lt;batch size&gt;" in text  # markup in definitions is shown as text


def test_empty_results_folder(tmp_path):
    from gradio_client import Client

    from moecap.leaderboard.app import build_app

    demo = build_app(str(tmp_path / "nothing-here"))
    demo.queue()
    try:
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                    quiet=True, show_error=True)
        c = Client(demo.local_url, verbose=False)
        assert c.predict(api_name="/filter_table")["data"] in ([], [[]]) or not _rows(
            c.predict(api_name="/filter_table"))
        assert c.predict(api_name="/roofline")["type"] == "plotly"
    finally:
        demo.close()


def _settle(page) -> None:
    """Wait until no Gradio component shows its pending overlay, then let Plotly lay out."""
    try:
        page.wait_for_function(
            "() => !document.querySelector('.pending, .generating, .eta-bar')", timeout=15_000)
    except Exception:
        pass  # a screenshot of a still-loading page is better than none
    page.wait_for_timeout(700)


def _default_headers(app_url) -> list[str]:
    """The default table's column headers, the rank excepted."""
    from gradio_client import Client

    return [h for h in Client(app_url, verbose=False).predict(api_name="/filter_table")["headers"] if h != "#"]


def _in_viewport(page, locator) -> bool:
    box = locator.bounding_box()
    vp = page.viewport_size
    return bool(box) and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= vp["width"] \
        and box["y"] + box["height"] <= vp["height"]


def _as_shown(value) -> str:
    """A cell value as the browser shows it (JavaScript's number formatting: 1375.0 is "1375")."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _median(value) -> float:
    """A figure as the table gives it: a number, or "median [lo–hi]" with repetitions."""
    return float(str(value).split(" [")[0])


def _visible_cell(page, value):
    """The cell showing ``value``; a figure with repetitions reads "median [lo–hi]" (the phone's compact
    table: the median alone), so its median's text finds it in both."""
    text = _as_shown(_median(value)) if " [" in str(value) else _as_shown(value)
    return page.locator("#leaderboard-table span:visible").filter(has_text=text).first


def _readable(locator) -> bool:
    """The cell's whole text is drawn: not cut off with an ellipsis, not overflowing its cell."""
    return locator.evaluate(
        "(el) => { const td = el.closest('[role=gridcell], td') || el; "
        "return el.scrollWidth <= el.clientWidth + 1 && td.scrollWidth <= td.clientWidth + 1; }")


@pytest.mark.parametrize("size", [(1440, 900), (390, 844)], ids=["desktop", "phone"])
def test_browser_first_screen_and_empty_state(app_url, client, artifacts_dir, size):
    """The best row of the default ranking is on the first screen (at desktop size with its C, A and P
    figures); a search with no match says so."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    best = _rows(client.predict(api_name="/filter_table"))[0]
    assert best["#"] == 1
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(app_url, wait_until="domcontentloaded", timeout=30_000)
            top = _visible_cell(page, best["Output throughput (tok/s)"])
            top.wait_for(state="attached", timeout=30_000)
            _settle(page)
            name = "desktop" if size[0] > 800 else "phone"
            page.screenshot(path=str(artifacts_dir / f"leaderboard-first-screen-{name}.png"))
            assert _in_viewport(page, page.locator("#leaderboard-table th:visible").filter(has_text="#").first)
            # at both sizes: who, then C, A and P of the best row, on the first screen and readable whole
            for header in ("Model", "System", "Cost ($/1M tok)", "Accuracy", "Output throughput (tok/s)"):
                value = best[header]
                if name == "phone" and header == "Accuracy":  # the compact table: no standard error
                    value = float(value.split(" ± ")[0])
                cell = _visible_cell(page, value)
                assert _in_viewport(page, cell), (name, header, value, cell.bounding_box())
                assert _readable(cell), (name, header, value)
            if name == "phone":  # the compact table: rank, who, C, A, P and nothing else
                heads = [h.strip() for h in page.locator("#leaderboard-table th:visible").all_inner_texts()]
                assert len([h for h in heads if h]) <= 6, heads
            page.locator("#search textarea, #search input").first.fill("no-such-thing")
            page.locator("#no-rows").wait_for(state="visible", timeout=15_000)
            assert "No rows match" in page.locator("#no-rows").inner_text()
            _settle(page)
            page.screenshot(path=str(artifacts_dir / f"leaderboard-no-rows-{name}.png"))
        finally:
            browser.close()


@pytest.mark.parametrize("size", [(1440, 900), (390, 844)], ids=["desktop", "phone"])
def test_browser_row_opens_record_and_url_keeps_state(app_url, client, artifacts_dir, size):
    """A click on a row opens its record; the address carries the ranking, filters and search, and a
    page opened from it shows that view."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from urllib.parse import parse_qs, urlsplit

    cheapest = _rows(client.predict(load=["bs=1", "bs=4"], columns=["Cell", "Cost ($/1M tok)"],
                                    sort_by="Cost ($/1M tok)", api_name="/filter_table"))[0]
    name = "desktop" if size[0] > 800 else "phone"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(app_url + "?rank=usd_per_1m_output_tokens&load=bs%3D1&load=bs%3D4",
                      wait_until="domcontentloaded", timeout=30_000)
            page.locator('#leaderboard-table [data-testid="cell-0-1"]').first.wait_for(state="attached", timeout=30_000)
            _settle(page)
            assert page.locator("#rank-by input").first.input_value() == "Cost ($/1M tok)"
            rows = page.locator("#leaderboard-table [data-row]").evaluate_all(
                "(els) => [...new Set(els.map((e) => e.dataset.row))]")
            assert len(rows) == 2, rows  # bs=1 and bs=4, as the address asks
            if name == "desktop":  # the phone's compact table has no Load column
                loads = page.locator("#leaderboard-table span:visible").filter(has_text="bs=").all_inner_texts()
                assert sorted({t.strip() for t in loads if t.strip().startswith("bs=")}) == ["bs=1", "bs=4"], loads
            page.locator("#search textarea, #search input").first.fill("bs")
            page.wait_for_function("() => location.search.includes('q=bs')", timeout=15_000)
            query = parse_qs(urlsplit(page.url).query)
            assert query["rank"] == ["usd_per_1m_output_tokens"] and query["load"] == ["bs=1", "bs=4"]
            # a click on the first row (the cheapest of bs=1 and bs=4) opens its record
            page.locator('#leaderboard-table [data-testid="cell-0-1"]:visible').first.click()
            record_tab = page.get_by_role("tab", name="Record")
            page.wait_for_function(
                "() => [...document.querySelectorAll('[role=tab]')].some("
                "t => t.textContent.trim() === 'Record' and t.getAttribute('aria-selected') === 'true')"
                .replace(" and ", " && "), timeout=15_000)
            assert record_tab.get_attribute("aria-selected") == "true"
            pick = page.locator("#record-pick input").first
            # the picker names the record by what it is, and ends with the end of its cell id
            page.wait_for_function("(id) => document.querySelector('#record-pick input').value.endsWith(id)",
                                   arg=cheapest["Cell"][-8:], timeout=15_000)
            assert pick.input_value().startswith("tiny-moe · hf (attn=sdpa) · float32")
            page.locator("#latency-plot .js-plotly-plot").first.wait_for(timeout=30_000)
            _settle(page)
            page.screenshot(path=str(artifacts_dir / f"leaderboard-row-record-{name}.png"))
        finally:
            browser.close()


def test_browser_renders_table_and_plots(app_url, artifacts_dir):
    from gradio_client import Client

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded", timeout=30_000)
            table = page.locator("#leaderboard-table")
            table.get_by_text("bs=4").first.wait_for(state="attached", timeout=30_000)
            assert table.get_by_text("tiny-moe").count() >= 1
            _settle(page)
            page.screenshot(path=str(artifacts_dir / "leaderboard.png"), full_page=True)

            page.get_by_role("tab", name="CAP trade-offs").click()
            page.locator("#cap-plot-1 .js-plotly-plot").first.wait_for(timeout=30_000)
            page.locator("#radar-plot .js-plotly-plot").first.wait_for(timeout=30_000)
            assert page.locator("#cap-plot-1 svg.main-svg").count() >= 1
            _settle(page)
            # the radar as drawn: each system's points (C, A, P) all come from one record, whose own
            # figures they show
            traces = page.locator("#radar-plot .js-plotly-plot").first.evaluate(
                "(el) => el.data.map((t) => ({name: t.name, cells: t.customdata, meta: t.meta}))")
            table = _rows(Client(app_url, verbose=False).predict(
                columns=["Cell", "Cost ($/1M tok)", "Output throughput (tok/s)"], api_name="/filter_table"))
            by_cell = {r["Cell"]: r for r in table}
            assert traces and all(t["cells"] for t in traces)
            for t in traces:
                assert len(set(t["cells"])) == 1, t
                row = by_cell[t["cells"][0]]
                assert t["cells"][0] == table[0]["Cell"]  # the system's best on output throughput
                # the table rounds: throughput to 0.1 tok/s, cost to $0.0001
                assert t["meta"]["raw"]["P"] == pytest.approx(_median(row["Output throughput (tok/s)"]), abs=0.051)
                assert t["meta"]["raw"]["C"] == pytest.approx(_median(row["Cost ($/1M tok)"]), abs=0.000051)
            page.screenshot(path=str(artifacts_dir / "leaderboard-cap.png"), full_page=True)

            page.get_by_role("tab", name="Roofline").click()
            page.locator("#roofline-plot .js-plotly-plot").first.wait_for(timeout=30_000)
            _settle(page)
            page.screenshot(path=str(artifacts_dir / "leaderboard-roofline.png"), full_page=True)

            page.get_by_role("tab", name="About").click()
            about = page.locator("#about")
            about.get_by_text("Figures", exact=True).wait_for(timeout=30_000)
            text = about.inner_text()
            for label in _default_headers(app_url):  # every column of the table is defined there
                assert label.split(" (")[0] in text, label
            assert "higher is better" in text and "moecap publish" in text
            _settle(page)
            page.screenshot(path=str(artifacts_dir / "leaderboard-about.png"), full_page=True)

            page.get_by_role("tab", name="Record").click()
            page.locator("#bytes-plot .js-plotly-plot").first.wait_for(timeout=30_000)
            page.locator("#latency-plot .js-plotly-plot").first.wait_for(timeout=30_000)
            _settle(page)
            page.screenshot(path=str(artifacts_dir / "leaderboard-record.png"), full_page=True)
        finally:
            browser.close()
