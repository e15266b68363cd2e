"""Expert consolidation: several fine-tuned MoE models served from one, similar experts stored once (after
"QoS-Efficient Serving of Multiple Mixture-of-Expert LLMs Using Partial Runtime Reconfiguration", arXiv
2505.06481). Any family the engine serves (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE),
children given as local directories or hub ids; nothing is ever held whole for every child.

- :func:`check_architecture`: the children (and the base) really share an architecture; a clear error
  names the first field that differs.
- :func:`calibration_text`: each child's own data (a local text / jsonl file, an ``hf:`` data set with
  split and field, an embedded corpus; the embedded tiny-moe children default to their domain's
  validation text).
- :func:`measure_similarity`: for every child, MoE layer and expert, how far the child's expert is from the
  reference's, by **output distance** on the child's calibration activations (the relative squared error
  ||f_child(x) - f_ref(x)||^2 / ||f_child(x)||^2 on the tokens the child routes to that expert) and by
  relative weight distance ||W_child - W_ref||_F / ||W_ref||_F. The reference is the base (``base`` mode)
  or, with no base (``pairwise`` mode, as the paper's authors pair two fine-tunes), the children's mean
  expert. Streamed: one child model at a time collects its routed inputs, then the experts are read from
  the safetensors files (memory-mapped) one at a time. An expert the calibration data never routed to has
  no output distance: the plan falls back to its squared weight distance (so it is shared only when its
  weights equal the reference's) and says so.
- :func:`make_plan`: a threshold on the distance, or a byte budget for private copies (the most distant
  first), decides which (child, layer, expert) use the one shared copy and which keep a private copy. The
  plan is a JSON file (:class:`ConsolidationPlan`) that records the mode, the data each child was measured
  on and how many distances fell back to weights; :func:`format_plan` prints its saving per layer.
- :class:`ConsolidatedModel`: one transformers skeleton built on the meta device and filled from the
  checkpoints tensor by tensor; per MoE layer one :class:`~moecap.engine.store.ExpertStore` pool (shared
  copies + private copies) with a routing table per child; every child's non-expert weights (attention,
  norms, routers, shared experts, embeddings, LM head) kept in host memory (pinned with CUDA) or on the
  fast device, and copied into the skeleton on a side stream when a batch for another child runs
  (:meth:`ConsolidatedModel.activate`, timed per child).
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from moecap.engine.store import CostModel, ExpertStore, Slot, StoredExpert, expert_forward, moe_blocks, model_family

SHARED = -1  # in a plan: this (child, layer, expert) uses the shared copy


class ConsolidationError(ValueError):
    """Children that cannot be consolidated (different architectures, no calibration data ...)."""


def _load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from moecap.models import local_path_for

    return AutoModelForCausalLM.from_pretrained(local_path_for(str(path)), dtype=dtype).to(device).eval()


def resolve_dir(model: str | Path) -> Path:
    """A local checkpoint directory for an embedded name, a directory or a hub id (downloaded once by
    ``huggingface_hub``, safetensors and configs only)."""
    from moecap.models import local_path_for

    local = Path(local_path_for(str(model))).expanduser()
    if local.is_dir():
        return local
    if "/" in str(model) and not str(model).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    raise ConsolidationError(f"{model}: not a model directory, an embedded model or a hub id")


# ------------------------------------------------------------------------------------ architecture
# the fields that must agree for experts, routers and non-expert layers to be interchangeable
ARCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "num_local_experts", "num_experts", "num_experts_per_tok",
               "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
               "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings", "hidden_act")


def check_architecture(dirs: dict[str, str | Path]) -> Any:
    """The shared config of ``dirs`` (name -> checkpoint directory); raises :class:`ConsolidationError`
    naming the model and field that differ, or a family the engine does not serve."""
    from transformers import AutoConfig

    from moecap.engine.store import FAMILIES

    configs = {n: AutoConfig.from_pretrained(str(d)) for n, d in dirs.items()}
    (ref_name, ref), *others = configs.items()
    if getattr(ref, "model_type", None) not in FAMILIES:
        raise ConsolidationError(f"{ref_name} ({dirs[ref_name]}): model_type {getattr(ref, 'model_type', None)!r}; "
                                 f"consolidation serves {', '.join(FAMILIES)}")
    for name, cfg in others:
        diff = [f"{f} {getattr(cfg, f, None)!r} vs {getattr(ref, f, None)!r}" for f in ARCH_FIELDS
                if getattr(cfg, f, None) != getattr(ref, f, None)]
        if diff:
            raise ConsolidationError(f"{name} ({dirs[name]}) and {ref_name} ({dirs[ref_name]}) do not share an "
                                     f"architecture: {'; '.join(diff)}")
    return ref


def expert_sizes(config: Any, dtype: torch.dtype = torch.float32) -> dict[int, int]:
    """Bytes of one routed expert (gate/up and down) of each MoE layer at ``dtype``, from the config."""
    from moecap.engine.model import Arch

    arch = Arch.from_config(config)
    size = torch.empty((), dtype=dtype).element_size()
    return {i: 3 * arch.hidden * arch.moe_inter * size for i in arch.moe_layers}


# ------------------------------------------------------------------------------------- calibration
EMBEDDED_DOMAINS = ("code", "prose", "c")


def _domain_of(model_dir: Path) -> str | None:
    meta = Path(model_dir) / "moecap.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("domain")
    return None


def _jsonl_text(path: Path, key: str) -> str:
    parts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise ConsolidationError(f"{path}:{n}: not a JSON line ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            raise ConsolidationError(f"{path}:{n}: no string field {key!r} (name another with {path}#FIELD)")
        parts.append(obj[key])
    if not parts:
        raise ConsolidationError(f"{path}: no records")
    return "\n\n".join(parts)


def read_data(spec: str) -> str:
    """The text of a calibration data spec:

    - ``FILE.txt`` (any text file): the file;
    - ``FILE.jsonl[#FIELD]``: one JSON object per line, the string ``FIELD`` of each (default ``text``);
    - ``hf:DATASET[/CONFIG]@SPLIT[#FIELD]``: a hub data set through ``datasets`` (default field ``text``);
    - ``tiny-code`` / ``tiny-prose`` / ``tiny-c``: the embedded corpus's validation split (never its test
      split, which perplexity scores).
    """
    spec = str(spec).strip()
    if spec.startswith("hf:"):
        body, _, key = spec[3:].partition("#")
        name, _, split = body.partition("@")
        parts = name.split("/")
        repo, config = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else (name, "")
        try:
            import datasets

            ds = datasets.load_dataset(repo, config or None, split=split or "train")
            return "\n\n".join(str(t) for t in ds[key or "text"])
        except Exception as err:
            raise ConsolidationError(f"calibration data {spec!r} could not be loaded through `datasets` "
                                     f"({type(err).__name__}: {err})") from err
    path_part, _, key = spec.partition("#")
    path = Path(path_part).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".ndjson"):
            return _jsonl_text(path, key or "text")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ConsolidationError(f"{path}: empty")
        return text
    if spec.startswith("tiny-") and spec[5:] in EMBEDDED_DOMAINS:
        from moecap.corpus import domain_splits

        return domain_splits(spec[5:])["validation"]
    raise ConsolidationError(f"calibration data {spec!r}: not a file, not hf:DATASET[/CONFIG]@SPLIT[#FIELD], "
                             f"not an embedded corpus ({', '.join('tiny-' + d for d in EMBEDDED_DOMAINS)})")


def calibration_text(name: str, child_dir: Path, spec: str | None = None) -> tuple[str, str]:
    """(text, what it is) to measure child ``name`` on: ``spec`` (:func:`read_data`), else the embedded
    tiny-moe child's own domain (validation split)."""
    if spec:
        return read_data(spec), str(spec)
    domain = _domain_of(child_dir)
    if domain is None:
        raise ConsolidationError(f"child {name!r} ({child_dir}) is not an embedded tiny-moe child: name the data it "
                                 f"was tuned on, e.g. --data {name}=FILE.jsonl (or .txt, hf:DATASET@SPLIT#FIELD)")
    return read_data(f"tiny-{domain}"), f"tiny-{domain} (validation split, the child's own domain)"


def child_texts(child_dir: Path, dataset: str | None = None) -> tuple[str, str, str]:
    """(calibration text, test text, data set name) of an embedded tiny-moe child (its domain's
    validation and test splits), or of any child with its perplexity data set named."""
    from moecap.quality.perplexity import load_text

    domain = _domain_of(child_dir)
    if dataset is None and domain is None:
        raise ConsolidationError(f"{child_dir}: not an embedded tiny-moe child (no moecap.json domain); give its "
                                 "data set as CHILD=DATASET")
    name = dataset or f"tiny-{domain}"
    calib = read_data(f"tiny-{domain}") if domain else read_data(dataset)
    return calib, load_text(name), name


def calibration_windows(tokenizer: Any, text: str, context: int, count: int) -> list[list[int]]:
    from moecap.metrics.perplexity import windows as cut

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    wins = cut(ids, context, count)
    if not wins:
        raise ConsolidationError(f"the calibration text has {len(ids)} tokens: fewer than one window of {context}")
    return wins


# --------------------------------------------------------------------------------------- similarity
def _sources(dirs: dict[str, str | Path]) -> dict[str, Any]:
    from moecap.engine.model import CheckpointSource

    return {n: CheckpointSource(d) for n, d in dirs.items()}


def _expert(src: Any, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    gu, dn = src.expert(layer, e)
    return gu.float(), dn.float()


def _mean_expert(srcs: Sequence[Any], layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of expert ``e`` over ``srcs`` (float32), accumulated in float64 so that the mean of equal
    tensors is them; equal experts (what a threshold-0 plan shares) are returned as read, no arithmetic."""
    first = srcs[0].expert(layer, e)
    rest = [src.expert(layer, e) for src in srcs[1:]]
    if all(torch.equal(first[0], gu) and torch.equal(first[1], dn) for gu, dn in rest):
        return first[0].float(), first[1].float()
    acc_gu, acc_dn = first[0].double(), first[1].double()
    for gu, dn in rest:
        acc_gu.add_(gu.double())
        acc_dn.add_(dn.double())
    return (acc_gu / len(srcs)).float(), (acc_dn / len(srcs)).float()


def _router_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """The child as the engine's own model (every expert at full precision), streamed from its checkpoint
    a tensor at a time: it routes and computes as transformers does, without transformers' load-time
    copies."""
    from moecap.engine.model import load_engine_model
    from moecap.engine.store import ExpertPlan

    return load_engine_model(path, lambda arch: ExpertPlan.uniform({i: arch.experts for i in arch.moe_layers}),
                             "cpu", dtype)


def _give_back_memory() -> None:
    """Free what the last child held and hand the freed heap back to the system (glibc keeps it
    otherwise, and the next child's load would stack on top)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _out_distance(ref: tuple[torch.Tensor, torch.Tensor], mine: tuple[torch.Tensor, torch.Tensor], act: Any,
                  x: torch.Tensor) -> float:
    yc = expert_forward(x, mine[0], mine[1], act)
    yr = expert_forward(x, ref[0], ref[1], act)
    return float((yc - yr).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12))


@torch.inference_mode()
def measure_similarity(reference: str | Path | None, children: dict[str, str | Path],
                       calibration: dict[str, Sequence[Sequence[int]]], per_expert: int = 128,
                       dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Distances of every child's experts from the reference's, per layer and expert (see the module
    docstring). ``reference``: the base's directory, or None for pairwise mode (the children's mean).
    ``calibration[child]``: token windows of that child's own data. One child model is loaded at a time
    (in ``dtype``) to collect its routed inputs; experts are read from the checkpoints one at a time.

    Returns ``{"mode", "output": {child: {layer: [distance or None per expert]}}, "weight": ...,
    "tokens": {child: {layer: [routed tokens per expert]}}}``; None: no calibration token reached it."""
    from moecap.engine.model import Arch, _act
    from moecap.engine.planner import collect_routed

    dirs = {c: Path(d) for c, d in children.items()}
    config = check_architecture({"base": reference, **dirs} if reference is not None else dirs)
    arch = Arch.from_config(config)
    act = _act(arch.act)
    srcs = _sources(dirs)
    ref_src = _sources({"base": reference})["base"] if reference is not None else None
    out: dict[str, Any] = {"mode": "base" if reference is not None else "pairwise",
                           "output": {}, "weight": {}, "tokens": {}}
    for c, d in dirs.items():
        if log:
            log(f"similarity: {c}: routing its calibration data")
        model = _router_model(d, dtype)
        freq, samples, _ = collect_routed(model, calibration[c], per_expert)
        del model
        _give_back_memory()
        out["output"][c], out["weight"][c], out["tokens"][c] = {}, {}, {}
        for layer in arch.moe_layers:
            o_row: list[float | None] = []
            w_row: list[float] = []
            for e in range(arch.experts):
                mine = _expert(srcs[c], layer, e)
                ref = _expert(ref_src, layer, e) if ref_src is not None else _mean_expert(list(srcs.values()), layer, e)
                wr = torch.cat([ref[0].reshape(-1), ref[1].reshape(-1)])
                wc = torch.cat([mine[0].reshape(-1), mine[1].reshape(-1)])
                w_row.append(float((wc - wr).norm() / wr.norm().clamp_min(1e-12)))
                rows = samples[layer][e]
                o_row.append(_out_distance(ref, mine, act, torch.cat(rows)) if rows else None)
            out["output"][c][layer], out["weight"][c][layer] = o_row, w_row
            out["tokens"][c][layer] = [int(n) for n in freq[layer]]
            for src in (*srcs.values(), ref_src):
                if src is not None:
                    src.release()
        del samples
        _give_back_memory()
    return out


@torch.inference_mode()
def measure_children(base_dir: str | Path | None, child_dirs: dict[str, str | Path], dtype: torch.dtype = torch.float32,
                     context: int = 256, calibration_windows_n: int = 8, data: dict[str, str] | None = None,
                     per_expert: int = 128, log: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """(similarity, per-expert sizes) of ``child_dirs`` against ``base_dir`` (None: pairwise), each child
    measured on the first ``calibration_windows_n`` windows of its own data (:func:`calibration_text`,
    ``data[child]`` when given): what :func:`make_plan` takes. The similarity records the data, and the
    peak resident memory growth while measuring (Linux)."""
    from transformers import AutoTokenizer

    from moecap.engine.loadmem import PeakMemory

    dirs = {c: resolve_dir(d) for c, d in child_dirs.items()}
    base = resolve_dir(base_dir) if base_dir is not None else None
    tok = AutoTokenizer.from_pretrained(str(base or next(iter(dirs.values()))))
    used: dict[str, Any] = {}
    calib = {}
    for c, d in dirs.items():
        text, what = calibration_text(c, d, (data or {}).get(c))
        calib[c] = calibration_windows(tok, text, context, calibration_windows_n)
        used[c] = {"data": what, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "chars": len(text),
                   "windows": len(calib[c]), "tokens": sum(len(w) for w in calib[c])}
    t0 = time.perf_counter()
    with PeakMemory() as pm:
        sim = measure_similarity(base, dirs, calib, per_expert=per_expert, dtype=dtype, log=log)
    peak = pm.result()
    sim["data"] = used
    sim["measure"] = {"seconds": time.perf_counter() - t0, "peak_anon_growth_bytes": peak.get("peak_anon_growth_bytes"),
                      "dtype": str(dtype).replace("torch.", ""), "per_expert": per_expert, "context": context}
    config = check_architecture({"x": base or next(iter(dirs.values()))})
    return sim, expert_sizes(config, dtype)


# --------------------------------------------------------------------------------------------- plan
@dataclass
class ConsolidationPlan:
    """``assign[child][layer][e]``: ``SHARED`` (-1) or 0 (a private copy). Sizes in bytes. ``mode``: base
    (the shared copies stand for the base's experts) or pairwise (for the children's mean); ``data``: what
    each child was measured on; ``fallback``: per child, the (layer, expert) whose distance is the squared
    weight distance because no calibration token was routed there."""

    children: list[str]
    assign: dict[str, dict[int, list[int]]]
    expert_bytes: dict[int, int]  # bytes of one expert of each MoE layer
    threshold: float | None = None
    budget_bytes: float | None = None
    distances: dict[str, Any] = field(default_factory=dict)
    mode: str = "base"
    data: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, list[list[int]]] = field(default_factory=dict)
    measure: dict[str, Any] = field(default_factory=dict)

    def private(self, child: str, layer: int, e: int) -> bool:
        return self.assign[child][layer][e] != SHARED

    def layer_bytes(self, layer: int) -> dict[str, int]:
        """Expert bytes of a layer: stored consolidated vs one full copy per child."""
        n = len(next(iter(self.assign.values()))[layer])
        per = self.expert_bytes[layer]
        shared_used = sum(1 for e in range(n) if any(not self.private(c, layer, e) for c in self.children))
        privates = sum(1 for c in self.children for e in range(n) if self.private(c, layer, e))
        return {"consolidated": (shared_used + privates) * per, "separate": len(self.children) * n * per,
                "shared_experts": shared_used, "private_experts": privates}

    def totals(self) -> dict[str, Any]:
        cons = sum(self.layer_bytes(layer)["consolidated"] for layer in self.expert_bytes)
        sep = sum(self.layer_bytes(layer)["separate"] for layer in self.expert_bytes)
        privates = {c: sum(1 for layer in self.expert_bytes for e in range(len(self.assign[c][layer]))
                           if self.private(c, layer, e)) for c in self.children}
        return {"expert_bytes_consolidated": cons, "expert_bytes_separate": sep,
                "expert_saving": 1 - cons / sep if sep else 0.0, "private_experts": privates,
                "weight_fallback_experts": {c: len(v) for c, v in self.fallback.items()}}

    def to_dict(self) -> dict[str, Any]:
        return {"children": self.children, "mode": self.mode, "threshold": self.threshold,
                "budget_bytes": self.budget_bytes, "data": self.data, "measure": self.measure,
                "fallback": self.fallback,
                "expert_bytes": {str(k): v for k, v in self.expert_bytes.items()},
                "assign": {c: {str(k): v for k, v in rows.items()} for c, rows in self.assign.items()},
                "totals": self.totals(),
                "layers": {str(layer): self.layer_bytes(layer) for layer in sorted(self.expert_bytes)},
                "distances": self.distances}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConsolidationPlan":
        return cls(list(d["children"]), {c: {int(k): list(v) for k, v in rows.items()} for c, rows in d["assign"].items()},
                   {int(k): int(v) for k, v in d["expert_bytes"].items()}, d.get("threshold"), d.get("budget_bytes"),
                   dict(d.get("distances") or {}), d.get("mode", "base"), dict(d.get("data") or {}),
                   {c: [list(x) for x in v] for c, v in (d.get("fallback") or {}).items()}, dict(d.get("measure") or {}))

    def save(self, path: str | Path) -> None:
        from moecap.paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ConsolidationPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def make_plan(similarity: dict[str, Any], expert_bytes: dict[int, int], threshold: float | None = None,
              budget_bytes: float | None = None) -> ConsolidationPlan:
    """Private copies for the (child, layer, expert) whose distance exceeds ``threshold``; or, with
    ``budget_bytes``, for the most distant ones first while their bytes fit (both: the stricter). The
    distance is the output distance, or, for an expert no calibration token reached, the squared relative
    weight distance (0 only for weights equal to the reference's: an expert never routed to is not taken
    for identical), and the plan lists those."""
    if threshold is None and budget_bytes is None:
        raise ValueError("a consolidation plan needs a threshold or a budget for private copies")
    out, weight = similarity["output"], similarity.get("weight", {})
    children = list(out)
    fallback: dict[str, list[list[int]]] = {c: [] for c in children}
    dist: dict[str, dict[int, list[float]]] = {}
    for c, rows in out.items():
        dist[c] = {}
        for layer, row in rows.items():
            dist[c][layer] = []
            for e, d in enumerate(row):
                if d is None:
                    fallback[c].append([int(layer), e])
                    d = float(weight[c][layer][e]) ** 2
                dist[c][layer].append(float(d))
    assign = {c: {layer: [SHARED] * len(row) for layer, row in rows.items()} for c, rows in dist.items()}
    ranked = sorted(((d, c, layer, e) for c, rows in dist.items() for layer, row in rows.items()
                     for e, d in enumerate(row)), reverse=True)
    used = 0.0
    for d, c, layer, e in ranked:
        if threshold is not None and d <= threshold:
            break
        if budget_bytes is not None and used + expert_bytes[layer] > budget_bytes:
            continue
        assign[c][layer][e] = 0
        used += expert_bytes[layer]
    return ConsolidationPlan(children, assign, dict(expert_bytes), threshold, budget_bytes,
                             {"output": out, "weight": weight, "tokens": similarity.get("tokens", {})},
                             similarity.get("mode", "base"), dict(similarity.get("data") or {}), fallback,
                             dict(similarity.get("measure") or {}))


def format_plan(plan: ConsolidationPlan) -> str:
    lines = [f"{'layer':>5s} {'shared':>7s} {'private':>8s} {'separate MiB':>13s} {'consolidated MiB':>17s} {'saving':>7s}"]
    for layer in sorted(plan.expert_bytes):
        b = plan.layer_bytes(layer)
        lines.append(f"{layer:5d} {b['shared_experts']:7d} {b['private_experts']:8d} {b['separate'] / 2**20:13.2f} "
                     f"{b['consolidated'] / 2**20:17.2f} {1 - b['consolidated'] / b['separate']:7.1%}")
    t = plan.totals()
    lines.append(f"total: {t['expert_bytes_separate'] / 2**20:.2f} MiB of experts for {len(plan.children)} separate "
                 f"models -> {t['expert_bytes_consolidated'] / 2**20:.2f} MiB consolidated ({t['expert_saving']:.1%} "
                 f"saved); private experts per child: {t['private_experts']}")
    lines.append(f"mode: {plan.mode} (the shared copy stands for "
                 f"{'the base' if plan.mode == 'base' else 'the children' + chr(39) + 's mean'}'s expert)")
    for c in plan.children:
        used = plan.data.get(c) or {}
        n = len(plan.fallback.get(c, []))
        lines.append(f"  {c}: measured on {used.get('data', '?')} ({used.get('tokens', '?')} tokens)"
                     + (f"; {n} experts no token reached, judged by weight distance" if n else ""))
    peak = plan.measure.get("peak_anon_growth_bytes")
    if peak:
        lines.append(f"measuring took {plan.measure.get('seconds', 0):.1f} s, peak memory growth {peak / 2**20:.0f} MiB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- runtime
UNMAP_BYTES = 16 * 2**20  # after reading a tensor this large, unmap the checkpoint (its pages leave the RSS)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def skeleton(config: Any, src: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A transformers model of ``config`` whose non-expert weights are read from ``src`` (a
    :class:`~moecap.engine.model.CheckpointSource`) tensor by tensor; its routed experts are never
    allocated (they stay on the meta device until the caller replaces them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, p in list(model.named_parameters()):
        if ".experts." in name:
            continue
        t = src.get(name)
        _set_tensor(model, name, t.to(device=device, dtype=dtype, copy=True))
        if t.numel() * t.element_size() >= UNMAP_BYTES:
            src.release()  # a large tensor's mapped pages leave the process at once
    src.release()
    # buffers computed at construction (rotary frequencies): build those modules again, for real
    for mod_name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            with torch.device(device):
                fresh = type(mod)(config=getattr(mod, "config", config))
            parent, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, fresh)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


class ConsolidatedModel:
    """Children served from one skeleton: pooled experts per layer, non-expert weights swapped per child."""

    def __init__(self, base: str | Path | None, children: dict[str, str | Path], plan: ConsolidationPlan,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, non_expert_on_device: bool = False,
                 shared: str = "mean", fast_budget_bytes: float | None = None):
        """``base``: the children's base (its experts can be the shared copies), or None (pairwise plans).
        ``shared``: what the one shared copy of an expert is: the base's expert (``base``), or the mean
        of the children that share it (``mean``: closer to each of them when they moved alike; the only
        choice without a base). ``fast_budget_bytes``: the fast-device memory the weights may use (the
        skeleton's non-expert layers, every child's too with ``non_expert_on_device``, and the pooled
        experts); pooled experts that do not fit are kept in host memory, those the fewest children share
        first (they carry the least traffic). None: every pooled expert on the fast device.

        Built from the checkpoints tensor by tensor (memory-mapped safetensors): no child is ever loaded
        whole; the peak resident growth while building is in :meth:`memory` (Linux)."""
        from moecap.engine.loadmem import PeakMemory

        if shared not in ("base", "mean"):
            raise ValueError(f"shared={shared!r}: allowed base, mean")
        if base is None and shared == "base":
            raise ValueError("shared='base' needs the base model; a pairwise plan shares the children's mean")
        self.shared = shared
        self.device = torch.device(device)
        self.names = list(children)
        missing = [c for c in self.names if c not in plan.assign]
        if missing:
            raise ValueError(f"the consolidation plan has no assignment for {missing}; it covers {plan.children}")
        self.plan = plan
        t0 = time.perf_counter()
        with PeakMemory() as pm:
            self._build(base, children, plan, dtype, non_expert_on_device, fast_budget_bytes)
        self.load_info = {"seconds": time.perf_counter() - t0, **pm.result()}
        self.activate(self.names[0])

    def _build(self, base: str | Path | None, children: dict[str, str | Path], plan: ConsolidationPlan,
               dtype: torch.dtype, non_expert_on_device: bool, fast_budget_bytes: float | None) -> None:
        from moecap.engine.model import Arch, _act

        dirs = {c: resolve_dir(d) for c, d in children.items()}
        base_dir = resolve_dir(base) if base is not None else None
        config = check_architecture({"base": base_dir, **dirs} if base_dir is not None else dirs)
        arch = Arch.from_config(config)
        srcs = _sources(dirs)
        base_src = _sources({"base": base_dir})["base"] if base_dir is not None else None
        fast, host = self.device, torch.device("cpu")
        # the skeleton carries the first child's non-expert weights (activate() copies in the others')
        model = skeleton(config, srcs[self.names[0]], fast, dtype)
        model_family(model)
        self.model = model
        blocks = moe_blocks(model)
        full = Slot("fast", "full")
        act = _act(arch.act)
        pools: dict[int, list[StoredExpert]] = {}
        tables: dict[str, dict[int, list[int]]] = {c: {} for c in self.names}
        for i, _, _b in blocks:
            pools[i] = []
            for e in range(arch.experts):
                sharers = [c for c in self.names if not plan.private(c, i, e)]
                entry = -1
                if sharers:
                    if self.shared == "base":
                        gu, dn = base_src.expert(i, e)
                        gu, dn = gu.float(), dn.float()
                    else:
                        gu, dn = _mean_expert([srcs[c] for c in sharers], i, e)
                    entry = len(pools[i])
                    pools[i].append(StoredExpert(gu.to(dtype), dn.to(dtype), full, 64, fast, host, act))
                for c in self.names:
                    tables[c].setdefault(i, []).append(entry)
                for c in self.names:
                    if plan.private(c, i, e):
                        gu, dn = srcs[c].expert(i, e)
                        tables[c][i][e] = len(pools[i])
                        pools[i].append(StoredExpert(gu.to(dtype, copy=True), dn.to(dtype, copy=True), full, 64,
                                                     fast, host, act))
            for src in (*srcs.values(), base_src):
                if src is not None:
                    src.release()
            _give_back_memory()
        # every child's non-expert weights, read tensor by tensor
        names = [n for n, _ in model.named_parameters() if ".experts." not in n]
        pin = self.device.type == "cuda" and not non_expert_on_device
        self.non_expert: dict[str, dict[str, torch.Tensor]] = {}
        for c in self.names:
            keep = {}
            for n in names:
                t = srcs[c].get(n)
                if non_expert_on_device:
                    keep[n] = t.to(device=self.device, dtype=dtype, copy=True)
                else:
                    keep[n] = t.to(dtype=dtype, copy=True)
                    if pin:
                        keep[n] = keep[n].pin_memory()
                if t.numel() * t.element_size() >= UNMAP_BYTES:
                    srcs[c].release()
            srcs[c].release()
            self.non_expert[c] = keep
            _give_back_memory()
        self.tables = tables
        if fast_budget_bytes is not None:
            fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
            if non_expert_on_device:
                fixed *= 1 + len(self.names)
            room = fast_budget_bytes - fixed
            sharers_of = {(i, k): sum(tables[c][i].count(k) for c in self.names) for i in pools for k in range(len(pools[i]))}
            # keep the most shared entries (ties: earlier layers) on the fast device while they fit
            for i, k in sorted(sharers_of, key=lambda key: (-sharers_of[key], key)):
                entry = pools[i][k]
                if entry.nbytes() <= room:
                    room -= entry.nbytes()
                else:
                    pools[i][k] = StoredExpert(entry.gate_up, entry.down, Slot("host", "full"), 64, fast, host, act)
        self.stores: list[ExpertStore] = []
        from moecap.engine.store import EngineMoeBlock

        for i, layer, b in blocks:
            store = ExpertStore(i, pools[i], act, fast, host, CostModel(), cache_size=0,
                                table=tables[self.names[0]][i], num_experts=arch.experts)
            self.stores.append(store)
            layer.mlp = EngineMoeBlock(b, store, arch.family, arch.top_k, arch.norm_topk)
            del b.experts
        self._params = {n: p for n, p in model.named_parameters() if n in set(names)}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.active: str | None = None
        self.swaps = 0
        self.swap_seconds: list[float] = []
        self.swap_seconds_by_child: dict[str, list[float]] = {c: [] for c in self.names}

    @torch.inference_mode()
    def activate(self, child: str) -> float:
        """Make ``child`` the model the skeleton computes: its routing tables and its non-expert weights
        (copied on a side stream with CUDA). Returns the seconds it took (0.0 if already active)."""
        if child not in self.non_expert:
            raise KeyError(f"unknown model {child!r}; served: {', '.join(self.names)}")
        if child == self.active:
            return 0.0
        t0 = time.perf_counter()
        src = self.non_expert[child]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for n, p in self._params.items():
                    p.data.copy_(src[n], non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            torch.cuda.synchronize(self.device)
        else:
            for n, p in self._params.items():
                p.data.copy_(src[n])
        for store in self.stores:
            store.set_table(self.tables[child][store.layer])
        first = self.active is None
        self.active = child
        dt = time.perf_counter() - t0
        if not first:  # the first activation is part of loading, not a switch
            self.swaps += 1
            self.swap_seconds.append(dt)
            self.swap_seconds_by_child[child].append(dt)
        return dt

    def memory(self) -> dict[str, int]:
        experts = sum(sum(e.nbytes() for e in s.experts) for s in self.stores)
        fast = sum(sum(e.nbytes() for e in s.experts if e.slot.placement == "fast") for s in self.stores)
        skeleton = sum(p.numel() * p.element_size() for p in self._params.values())
        per_child = sum(t.numel() * t.element_size() for t in next(iter(self.non_expert.values())).values())
        out = {"expert_bytes": experts, "expert_bytes_fast": fast, "expert_bytes_host": experts - fast,
               "skeleton_non_expert_bytes": skeleton,
               "child_non_expert_bytes_each": per_child,
               "child_non_expert_bytes_total": per_child * len(self.names),
               "total_bytes": experts + skeleton + per_child * len(self.names)}
        for k in ("peak_anon_growth_bytes", "peak_rss_growth_bytes"):
            if self.load_info.get(k) is not None:
                out[f"load_{k}"] = int(self.load_info[k])
        return out
