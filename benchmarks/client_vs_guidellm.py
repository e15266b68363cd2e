"""moecap's streaming client against an independent one (guidellm) on the same llama.cpp server.

    python benchmarks/client_vs_guidellm.py --llama-server PATH/llama-server --gguf MODEL.gguf \
        --model-dir HF_DIR --guidellm PATH/guidellm [--concurrency 1 4] [--requests 24] [--rounds 2]

Starts llama.cpp's own ``llama-server`` on the GGUF (``-np 4``), then, interleaved per round and
concurrency: guidellm (``guidellm run``, synthetic prompts of ``--input`` tokens, ``--output`` tokens
each) and ``moecap run`` with the ``openai`` runner (the same lengths, token-id prompts, the HF model
directory's tokenizer). Both send ``ignore_eos`` so every request yields exactly ``--output`` tokens,
and neither is served from the prompt cache (guidellm sends ``cache_prompt: false``; moecap salts each
run's prompts). Reports each figure side by side with the ratio moecap / guidellm:

- TTFT: both first output chunk - request sent, per request (mean, median);
- TPOT (vLLM's definition, (last - first chunk) / (tokens - 1)) against guidellm's
  ``inter_token_latency_ms``, which is that definition (guidellm's own ``time_per_output_token_ms``
  includes the TTFT, so it is a different figure);
- E2E latency against guidellm's ``request_latency``;
- output throughput: moecap's output tokens / duration against guidellm's ``output_tokens_per_second``
  mean (tokens over its measured window);
- failed requests on each side;
- the server's own decode time per token over each client's window (llama-server's ``/metrics``:
  ``tokens_predicted_seconds_total / tokens_predicted_total``), which says how much of a difference
  between the clients is the server running slower under one of them (both share the machine's cores).

Nothing here is a pass/fail assert: a shared 2-core machine is noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def wait_ready(url: str, deadline_s: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {deadline_s:.0f} s")


def server_decode(base: str) -> tuple[float, float]:
    """(seconds spent predicting tokens, tokens predicted) so far, from llama-server's Prometheus metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:tokens_predicted_seconds_total") or line.startswith("llamacpp:tokens_predicted_total"):
            name, value = line.split()[:2]
            vals[name] = float(value)
    return vals["llamacpp:tokens_predicted_seconds_total"], vals["llamacpp:tokens_predicted_total"]


def windowed(base: str, fn, *args) -> dict:
    s0, n0 = server_decode(base)
    out = fn(*args)
    s1, n1 = server_decode(base)
    out["server_decode_ms_per_token"] = 1e3 * (s1 - s0) / (n1 - n0) if n1 > n0 else None
    return out


def run_guidellm(exe: str, base: str, tokenizer: str, concurrency: int, n: int, n_in: int, n_out: int,
                 out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [exe, "run",
           "--backend", f"kind=openai_http,target={base},request_format=/v1/completions,extras.body.cache_prompt=false",
           "--profile", f"kind=concurrent,streams={concurrency}",
           "--constraint", f"kind=max_requests,count={n}",
           "--data", f"kind=synthetic_text,prompt_tokens={n_in},output_tokens={n_out}",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
           "--output", f"kind=json,path={out}", "--disable-progress"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    reqs = bench["requests"]["successful"]

    def per_request(key: str, scale: float = 1.0) -> dict:
        xs = [r[key] * scale for r in reqs if r.get(key) is not None]
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs)} if xs else {}

    totals = m["request_latency"]
    return {
        "ttft_ms": per_request("time_to_first_token_ms"),
        "tpot_ms": per_request("inter_token_latency_ms"),
        "e2el_ms": per_request("request_latency", 1e3),
        "output_tokens_per_s": m["output_tokens_per_second"]["successful"]["mean"],
        "failed": (totals.get("errored") or {}).get("count", 0) + (totals.get("incomplete") or {}).get("count", 0),
        "completed": totals["successful"]["count"],
    }


def run_moecap(base: str, model_dir: str, concurrency: int, n: int, n_in: int, n_out: int, out: Path) -> dict:
    from moecap import figures
    from moecap.records import load_records

    suite = {
        "name": "vs-guidellm",
        "models": [{"id": model_dir, "name": "m"}],
        "runners": [{"type": "openai", "args": {"base_url": base, "model": "m", "tokenizer": model_dir}}],
        "workloads": [{"name": "w", "input_tokens": n_in, "output_tokens": n_out, "num_prompts": n}],
        "loads": [{"concurrency": concurrency}],
        "output": {"dir": str(out)},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "suite.json"
    path.write_text(json.dumps(suite))
    subprocess.run([sys.executable, "-m", "moecap", "run", str(path), "--executor", "inline", "--force"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ((_, rec),) = load_records(out / "vs-guidellm")
    rep = rec.report
    return {
        "ttft_ms": {"mean": figures.value(rep, "ttft_ms_mean"), "median": figures.value(rep, "ttft_ms_p50")},
        "tpot_ms": {"mean": figures.value(rep, "tpot_ms_mean"), "median": figures.value(rep, "tpot_ms_p50")},
        "e2el_ms": {"mean": figures.value(rep, "e2el_ms_mean"), "median": figures.value(rep, "e2el_ms_p50")},
        "output_tokens_per_s": figures.value(rep, "output_tokens_per_s"),
        "failed": figures.value(rep, "failed_requests"),
        "completed": figures.value(rep, "completed_requests"),
        "status": rec.status,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model-dir", required=True, help="the HF directory the GGUF came from (tokenizer, config)")
    ap.add_argument("--guidellm", required=True, help="the guidellm executable (its own environment)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=18091)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args(argv)

    base = f"http://127.0.0.1:{a.port}"
    work = Path(tempfile.mkdtemp(prefix="moecap-vs-guidellm-"))
    log = open(work / "llama-server.log", "w")
    server = subprocess.Popen([a.llama_server, "-m", a.gguf, "--host", "127.0.0.1", "--port", str(a.port),
                               "-np", "4", "-t", str(a.threads), "-c", str(4 * 2 * (a.input + a.output + 64)),
                               "--alias", "m", "--metrics"], stdout=log, stderr=subprocess.STDOUT)
    results: list[dict] = []
    try:
        wait_ready(base + "/health")
        for rnd in range(a.rounds):
            for c in a.concurrency:
                g = windowed(base, run_guidellm, a.guidellm, base, a.model_dir, c, a.requests, a.input, a.output,
                             work / f"g-{rnd}-{c}.json")
                m = windowed(base, run_moecap, base, a.model_dir, c, a.requests, a.input, a.output,
                             work / f"m-{rnd}-{c}")
                results.append({"round": rnd, "concurrency": c, "guidellm": g, "moecap": m})
                print(f"round {rnd} concurrency {c}: done", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    rows = [("TTFT mean ms", "ttft_ms", "mean"), ("TTFT p50 ms", "ttft_ms", "median"),
            ("TPOT mean ms", "tpot_ms", "mean"), ("TPOT p50 ms", "tpot_ms", "median"),
            ("E2E mean ms", "e2el_ms", "mean"), ("E2E p50 ms", "e2el_ms", "median"),
            ("output tok/s", "output_tokens_per_s", None), ("failed", "failed", None),
            ("server ms/tok", "server_decode_ms_per_token", None)]
    print(f"{'round':>5} {'conc':>4}  {'figure':14s} {'moecap':>10} {'guidellm':>10} {'ratio':>7}")
    for r in results:
        for label, key, stat in rows:
            mv = r["moecap"][key] if stat is None else r["moecap"][key].get(stat)
            gv = r["guidellm"][key] if stat is None else r["guidellm"][key].get(stat)
            ratio = f"{mv / gv:7.3f}" if isinstance(mv, (int, float)) and isinstance(gv, (int, float)) and gv else "      -"
            print(f"{r['round']:>5} {r['concurrency']:>4}  {label:14s} {mv:>10.2f} {gv:>10.2f} {ratio}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"(server log and raw outputs under {work})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
