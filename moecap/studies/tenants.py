"""``moecap engine tenants``: the multi-tenant comparison of ``moecap serve`` backends from their records.

Reads the records a multi-model suite wrote (``moecap run consolidation-cpu``: the ``moecap-serve``
runner, one runner per backend, a multi-tenant trace) and puts side by side, per backend and load:
each child's turnaround (E2E latency) and TTFT, the switches between children and what they cost, the
expert memory each backend keeps (and how much of it on the fast device), and each child's perplexity on
its own domain from the quality cells. Prints a table and draws ``tenants.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecap import figures
from moecap.figures import dig
from moecap.records import load_records


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def collect(root: str | Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """(one row per (backend runner, load, child) of the performance records, {runner: {child: own-domain
    perplexity}} from the quality records). Only ``moecap-serve`` records with per-model figures count."""
    rows: list[dict[str, Any]] = []
    quality: dict[str, dict[str, float]] = {}
    for _, rec in load_records(root):
        runner = dig(rec.config, ("runner",)) or {}
        if rec.status != "ok" or runner.get("type") != "moecap-serve":
            continue
        label = runner.get("display_name") or runner.get("name") or "?"
        args = runner.get("resolved_args") or runner.get("args") or {}
        rep = rec.report
        per = figures.per_model(rep)
        if per and all(set(r) == {"quality"} for r in per.values()):  # a quality record, per child
            own = {}
            for child, q in per.items():
                value = figures.value(q, "ppl:tiny-" + child.removeprefix("tiny-moe-"))
                if value is not None:
                    own[child] = value
            quality[label] = own
            continue
        if not per:
            continue
        experts = figures.value(rep, "server_expert_bytes")  # every backend reports it
        fast = figures.value(rep, "server_expert_bytes_fast")
        load = dig(rec.config, ("load",)) or {}
        load_s = f"rate={load['rate']:g}" if load.get("rate") else (
            f"conc={load.get('concurrency')}" if load.get("concurrency") else f"batch={load.get('batch_size')}")
        for child, fig in per.items():
            rows.append({
                "runner": label, "backend": args.get("backend", "separate"), "load": load_s, "child": child,
                "requests": fig.get("requests"),
                "e2el_p50_ms": figures.value(fig, "e2el_ms_p50"),
                "e2el_p90_ms": figures.value(fig, "e2el_ms_p90"),
                "ttft_p50_ms": figures.value(fig, "ttft_ms_p50"),
                "switches": _int(figures.value(rep, "server_switches")),
                "switch_ms_mean": figures.value(rep, "server_switch_ms_mean"),
                "child_swap_ms": None if not isinstance(fig.get("switch"), dict)
                else 1e3 * fig["switch"]["switch_s_total"],
                "swap_share_ttft": (fig.get("switch") or {}).get("share_of_ttft"),
                "expert_mib": None if experts is None else experts / 2**20,
                "expert_fast_mib": None if fast is None else fast / 2**20,
            })
    rows.sort(key=lambda r: (r["load"], r["runner"], r["child"]))
    return rows, quality


def format_table(rows: list[dict[str, Any]], quality: dict[str, dict[str, float]]) -> str:
    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = ["runner", "backend", "load", "child", "req", "E2E p50 ms", "E2E p90 ms", "TTFT p50 ms", "switches",
            "switch ms", "swap ms (child)", "swap % of TTFT", "experts MiB", "fast MiB", "own-domain ppl"]
    body = [[r["runner"], r["backend"], r["load"], r["child"], f(r["requests"]), f(r["e2el_p50_ms"]),
             f(r["e2el_p90_ms"]), f(r["ttft_p50_ms"]), f(r["switches"]), f(r["switch_ms_mean"], 2),
             f(r["child_swap_ms"], 2), f(None if r["swap_share_ttft"] is None else 100 * r["swap_share_ttft"], 2),
             f(r["expert_mib"]), f(r["expert_fast_mib"]), f(quality.get(r["runner"], {}).get(r["child"]), 2)]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], quality: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Per load: each child's median and p90 turnaround by backend (bars), plus expert memory by backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    loads = sorted({r["load"] for r in rows})
    runners = sorted({r["runner"] for r in rows})
    children = sorted({r["child"] for r in rows})
    fig, axes = plt.subplots(1, len(loads) + 1, figsize=(5.5 * (len(loads) + 1), 4.5), dpi=120, squeeze=False)
    width = 0.8 / max(1, len(runners))
    for ax, load in zip(axes[0], loads):
        for j, runner in enumerate(runners):
            by = {r["child"]: r for r in rows if r["load"] == load and r["runner"] == runner}
            xs = [i + j * width for i in range(len(children))]
            p50 = [by.get(c, {}).get("e2el_p50_ms") or 0 for c in children]
            p90 = [by.get(c, {}).get("e2el_p90_ms") or 0 for c in children]
            ax.bar(xs, p90, width, color=f"C{j}", alpha=0.35)
            ax.bar(xs, p50, width, color=f"C{j}", label=runner)
        ax.set_xticks([i + width * (len(runners) - 1) / 2 for i in range(len(children))])
        ax.set_xticklabels([c.removeprefix("tiny-moe-") for c in children])
        ax.set_ylabel("turnaround (E2E latency) ms: p50 solid, p90 light")
        ax.set_title(f"per-child turnaround, {load}")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    mem = {}
    for r in rows:
        mem.setdefault(r["runner"], (r["expert_mib"], r["expert_fast_mib"]))
    for j, runner in enumerate(runners):
        experts, fast = mem[runner]
        total = experts or 0
        ax.bar(j, total, color=f"C{j}", alpha=0.35)
        ax.bar(j, fast if fast is not None else total, color=f"C{j}")
        own = quality.get(runner)
        if own:  # one line per child, above the bar
            ax.annotate("\n".join(f"{c.removeprefix('tiny-moe-')} {own[c]:.1f}" for c in children if c in own),
                        (j, total), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.35 * max((m[0] or 0) for m in mem.values()) or 1)
    ax.set_xticks(range(len(runners)))
    ax.set_xticklabels(runners, rotation=20, fontsize=8)
    ax.set_ylabel("expert MiB (solid: on the fast device)")
    ax.set_title("expert memory; own-domain perplexity above")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
