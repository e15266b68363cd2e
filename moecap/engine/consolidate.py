"""Expert consolidation: several fine-tuned children of one base MoE served from one model, similar
experts stored once (after "QoS-Efficient Serving of Multiple Mixture-of-Expert LLMs Using Partial Runtime
Reconfiguration", arXiv 2505.06481).

- :func:`measure_similarity`: for every child, MoE layer and expert, how far the child's expert is from
  the base's: by **output distance** on calibration activations (the relative squared error
  ||f_child(x) - f_base(x)||^2 / ||f_child(x)||^2 on tokens the child routes to that expert, from the child's
  own domain text; raw weight cosine is ~1 for every fine-tune and says nothing) and by relative weight
  distance ||W_child - W_base||_F / ||W_base||_F. Child-to-child output distances are kept too.
- :func:`make_plan`: a threshold on the output distance, or a byte budget for private copies (the most
  distant experts get them first), decides which (child, layer, expert) map to the one shared copy (the
  base's expert) and which keep a private copy. The plan is a JSON file (:class:`ConsolidationPlan`), and
  :func:`format_plan` prints its memory saving per layer.
- :class:`ConsolidatedModel`: one model skeleton; per MoE layer one :class:`~moecap.engine.store.ExpertStore`
  pool (shared copies + private copies) with a routing table per child; every child's non-expert weights
  (attention, norms, routers, embeddings, LM head) kept in host memory (pinned with CUDA) or on the fast
  device while room allows, and copied into the skeleton on a side stream when a batch for another
  child runs (:meth:`ConsolidatedModel.activate`, timed).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moecap.engine.store import CostModel, ExpertStore, Slot, StoredExpert, expert_forward, moe_blocks, model_family

SHARED = -1  # in a plan: this (child, layer, expert) uses the shared copy


def _load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from moecap.models import local_path_for

    return AutoModelForCausalLM.from_pretrained(local_path_for(str(path)), dtype=dtype).to(device).eval()


def _expert_fn(gate_up: torch.Tensor, down: torch.Tensor, act: Any, x: torch.Tensor) -> torch.Tensor:
    return expert_forward(x, gate_up, down, act)


# --------------------------------------------------------------------------------------- similarity
def _routed_inputs(model: nn.Module, windows: Sequence[Sequence[int]], per_expert: int) -> dict[int, list[torch.Tensor]]:
    """Per MoE layer and expert, up to ``per_expert`` hidden states the model routes to it."""
    from moecap.engine.planner import collect_routed

    _, samples, _ = collect_routed(model, windows, per_expert)
    return {i: [torch.cat(v) if v else torch.zeros(0) for v in rows] for i, rows in samples.items()}


def expert_sizes(model: nn.Module) -> dict[int, int]:
    """Bytes of one routed expert (gate/up and down) of each MoE layer, at the model's dtype."""
    return {i: b.experts.gate_up_proj[0].numel() * b.experts.gate_up_proj.element_size()
            + b.experts.down_proj[0].numel() * b.experts.down_proj.element_size() for i, _, b in moe_blocks(model)}


def _expert_tensors(model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor, Any]]:
    return {i: (b.experts.gate_up_proj.detach().float().cpu(), b.experts.down_proj.detach().float().cpu(),
                b.experts.act_fn) for i, _, b in moe_blocks(model)}


def measure_similarity(base: nn.Module, children: dict[str, nn.Module], calibration: dict[str, Sequence[Sequence[int]]],
                       per_expert: int = 256) -> dict[str, Any]:
    """Distances of every child's experts from the base's (and from each other's), per layer and expert.

    ``calibration[child]``: token windows of that child's own domain; the inputs to child ``c``'s expert e
    are the tokens child ``c`` routes to e on that text. Returns ``{"output": {child: {layer: [per expert]}},
    "weight": ..., "pairwise": {"a|b": {layer: [...]}}, "tokens": {child: {layer: [n per expert]}}}``."""
    ref = _expert_tensors(base)
    out: dict[str, Any] = {"output": {}, "weight": {}, "pairwise": {}, "tokens": {}}
    tensors = {c: _expert_tensors(m) for c, m in children.items()}
    inputs = {c: _routed_inputs(m, calibration[c], per_expert) for c, m in children.items()}
    for c in children:
        out["output"][c], out["weight"][c], out["tokens"][c] = {}, {}, {}
        for layer, (gu_b, dn_b, act) in ref.items():
            gu_c, dn_c, _ = tensors[c][layer]
            o_row, w_row, n_row = [], [], []
            for e in range(gu_b.shape[0]):
                wb = torch.cat([gu_b[e].reshape(-1), dn_b[e].reshape(-1)])
                wc = torch.cat([gu_c[e].reshape(-1), dn_c[e].reshape(-1)])
                w_row.append(float((wc - wb).norm() / wb.norm().clamp_min(1e-12)))
                x = inputs[c][layer][e]
                n_row.append(int(x.shape[0]))
                if x.numel() == 0:
                    o_row.append(0.0)  # the child never routes there on its own text: sharing costs nothing seen
                    continue
                yc = _expert_fn(gu_c[e], dn_c[e], act, x)
                yb = _expert_fn(gu_b[e], dn_b[e], act, x)
                o_row.append(float((yc - yb).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12)))
            out["output"][c][layer], out["weight"][c][layer], out["tokens"][c][layer] = o_row, w_row, n_row
    names = list(children)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            rows = {}
            for layer, (_, _, act) in ref.items():
                gu_a, dn_a, _ = tensors[a][layer]
                gu_b2, dn_b2, _ = tensors[b][layer]
                row = []
                for e in range(gu_a.shape[0]):
                    x = torch.cat([inputs[a][layer][e], inputs[b][layer][e]])
                    if x.numel() == 0:
                        row.append(0.0)
                        continue
                    ya, yb = _expert_fn(gu_a[e], dn_a[e], act, x), _expert_fn(gu_b2[e], dn_b2[e], act, x)
                    row.append(float((ya - yb).pow(2).sum() / ya.pow(2).sum().clamp_min(1e-12)))
                rows[layer] = row
            out["pairwise"][f"{a}|{b}"] = rows
    return out


# --------------------------------------------------------------------------------------------- plan
@dataclass
class ConsolidationPlan:
    """``assign[child][layer][e]``: ``SHARED`` (-1) or 0 (a private copy). Sizes in bytes."""

    children: list[str]
    assign: dict[str, dict[int, list[int]]]
    expert_bytes: dict[int, int]  # bytes of one expert of each MoE layer
    threshold: float | None = None
    budget_bytes: float | None = None
    distances: dict[str, Any] = field(default_factory=dict)

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
                "expert_saving": 1 - cons / sep if sep else 0.0, "private_experts": privates}

    def to_dict(self) -> dict[str, Any]:
        return {"children": self.children, "threshold": self.threshold, "budget_bytes": self.budget_bytes,
                "expert_bytes": {str(k): v for k, v in self.expert_bytes.items()},
                "assign": {c: {str(k): v for k, v in rows.items()} for c, rows in self.assign.items()},
                "totals": self.totals(),
                "layers": {str(layer): self.layer_bytes(layer) for layer in sorted(self.expert_bytes)},
                "distances": self.distances}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConsolidationPlan":
        return cls(list(d["children"]), {c: {int(k): list(v) for k, v in rows.items()} for c, rows in d["assign"].items()},
                   {int(k): int(v) for k, v in d["expert_bytes"].items()}, d.get("threshold"), d.get("budget_bytes"),
                   dict(d.get("distances") or {}))

    def save(self, path: str | Path) -> None:
        from moecap.paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ConsolidationPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def make_plan(similarity: dict[str, Any], expert_bytes: dict[int, int], threshold: float | None = None,
              budget_bytes: float | None = None) -> ConsolidationPlan:
    """Private copies for the (child, layer, expert) whose output distance exceeds ``threshold``; or,
    with ``budget_bytes``, for the most distant ones first while their bytes fit (both: the stricter)."""
    if threshold is None and budget_bytes is None:
        raise ValueError("a consolidation plan needs a threshold or a budget for private copies")
    dist = similarity["output"]
    children = list(dist)
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
                             {"output": dist, "weight": similarity.get("weight", {})})


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
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- runtime
class ConsolidatedModel:
    """Children served from one skeleton: pooled experts per layer, non-expert weights swapped per child."""

    def __init__(self, base: str | Path, children: dict[str, str | Path], plan: ConsolidationPlan,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, non_expert_on_device: bool = False,
                 shared: str = "mean", fast_budget_bytes: float | None = None):
        """``shared``: what the one shared copy of an expert is: the base's expert (``base``), or the mean
        of the children that share it (``mean``: closer to each of them when they moved alike).
        ``fast_budget_bytes``: the fast-device memory the weights may use (the skeleton's non-expert
        layers, every child's too with ``non_expert_on_device``, and the pooled experts); pooled experts
        that do not fit are kept in host memory, those the fewest children share first (they carry the
        least traffic). None: every pooled expert on the fast device."""
        if shared not in ("base", "mean"):
            raise ValueError(f"shared={shared!r}: allowed base, mean")
        self.shared = shared
        self.device = torch.device(device)
        self.names = list(children)
        missing = [c for c in self.names if c not in plan.assign]
        if missing:
            raise ValueError(f"the consolidation plan has no assignment for {missing}; it covers {plan.children}")
        self.plan = plan
        skeleton = _load(base, self.device, dtype)
        model_family(skeleton)
        self.model = skeleton
        blocks = moe_blocks(skeleton)
        fast, host = self.device, torch.device("cpu")
        cost = CostModel()
        full = Slot("fast", "full")
        # pools: entry e = the base's expert e (shared), then the private copies
        pools: dict[int, list[StoredExpert]] = {}
        tables: dict[str, dict[int, list[int]]] = {c: {} for c in self.names}
        for i, _, b in blocks:
            gu, dn = b.experts.gate_up_proj.data, b.experts.down_proj.data
            shared_needed = [any(not plan.private(c, i, e) for c in self.names) for e in range(gu.shape[0])]
            pools[i] = []
            shared_entry = {}
            for e in range(gu.shape[0]):
                if shared_needed[e]:
                    shared_entry[e] = len(pools[i])
                    pools[i].append(StoredExpert(gu[e], dn[e], full, 64, fast, host))
            for c in self.names:
                tables[c][i] = [shared_entry.get(e, -1) for e in range(gu.shape[0])]
        # private copies and per-child non-expert weights, one child at a time
        sums: dict[tuple[int, int], list[Any]] = {}  # (layer, e) -> [sum gate_up, sum down, count] for "mean"
        self.non_expert: dict[str, dict[str, torch.Tensor]] = {}
        names = [n for n, _ in skeleton.named_parameters() if ".experts." not in n]
        pin = self.device.type == "cuda" and not non_expert_on_device
        for c in self.names:
            child = _load(children[c], "cpu", dtype)
            params = dict(child.named_parameters())
            for i, _, b in moe_blocks(child):
                gu, dn = b.experts.gate_up_proj.data, b.experts.down_proj.data
                for e in range(gu.shape[0]):
                    if plan.private(c, i, e):
                        tables[c][i][e] = len(pools[i])
                        pools[i].append(StoredExpert(gu[e], dn[e], full, 64, fast, host))
                    elif shared == "mean":
                        acc = sums.setdefault((i, e), [torch.zeros_like(gu[e], dtype=torch.float32),
                                                       torch.zeros_like(dn[e], dtype=torch.float32), 0])
                        acc[0] += gu[e].float()
                        acc[1] += dn[e].float()
                        acc[2] += 1
            keep = {}
            for n in names:
                t = params[n].detach()
                t = t.to(self.device).clone() if non_expert_on_device else (t.clone().pin_memory() if pin else t.clone())
                keep[n] = t
            self.non_expert[c] = keep
            del child
        for (i, e), (sgu, sdn, n) in sums.items():  # the shared copies become the sharers' mean
            entry = next(tables[c][i][e] for c in self.names if not plan.private(c, i, e))
            pools[i][entry] = StoredExpert((sgu / n).to(dtype), (sdn / n).to(dtype), full, 64, fast, host)
        self.tables = tables
        if fast_budget_bytes is not None:
            fixed = sum(p.numel() * p.element_size() for n, p in skeleton.named_parameters() if ".experts." not in n)
            if non_expert_on_device:
                fixed *= 1 + len(self.names)
            room = fast_budget_bytes - fixed
            sharers = {(i, k): sum(tables[c][i].count(k) for c in self.names) for i in pools for k in range(len(pools[i]))}
            # keep the most shared entries (ties: earlier layers) on the fast device while they fit
            order = sorted(sharers, key=lambda key: (-sharers[key], key))
            for i, k in order:
                entry = pools[i][k]
                if entry.nbytes() <= room:
                    room -= entry.nbytes()
                else:
                    pools[i][k] = StoredExpert(entry.gate_up, entry.down, Slot("host", "full"), 64, fast, host)
        self.stores: list[ExpertStore] = []
        from moecap.engine.store import EngineMoeBlock

        cfg = skeleton.config
        norm = True if model_family(skeleton) == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False))
        for i, layer, b in blocks:
            store = ExpertStore(i, pools[i], b.experts.act_fn, fast, host, cost, cache_size=0,
                                table=tables[self.names[0]][i], num_experts=b.experts.gate_up_proj.shape[0])
            self.stores.append(store)
            layer.mlp = EngineMoeBlock(b, store, model_family(skeleton), int(cfg.num_experts_per_tok), norm)
            del b.experts
        swapped = set(names)
        self._params = {n: p for n, p in skeleton.named_parameters() if n in swapped}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.active: str | None = None
        self.swaps = 0
        self.swap_seconds: list[float] = []
        self.activate(self.names[0])

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
        self.active = child
        dt = time.perf_counter() - t0
        self.swaps += 1
        self.swap_seconds.append(dt)
        return dt

    def memory(self) -> dict[str, int]:
        experts = sum(sum(e.nbytes() for e in s.experts) for s in self.stores)
        fast = sum(sum(e.nbytes() for e in s.experts if e.slot.placement == "fast") for s in self.stores)
        skeleton = sum(p.numel() * p.element_size() for p in self._params.values())
        per_child = sum(t.numel() * t.element_size() for t in next(iter(self.non_expert.values())).values())
        return {"expert_bytes": experts, "expert_bytes_fast": fast, "expert_bytes_host": experts - fast,
                "skeleton_non_expert_bytes": skeleton,
                "child_non_expert_bytes_each": per_child,
                "child_non_expert_bytes_total": per_child * len(self.names),
                "total_bytes": experts + skeleton + per_child * len(self.names)}


# ---------------------------------------------------------------------- children and their texts


def _domain_of(model_dir: Path) -> str | None:
    meta = model_dir / "moecap.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("domain")
    return None


def child_texts(child_dir: Path, dataset: str | None = None) -> tuple[str, str, str]:
    """(calibration text, test text, dataset name) of a child: its embedded domain's validation and
    test splits for tiny-moe children, else the named perplexity data set (test) and stdlib text."""
    from moecap.corpus import domain_splits, stdlib_text
    from moecap.quality.perplexity import load_text

    domain = _domain_of(child_dir)
    if dataset is None and domain is None:
        raise ValueError(f"{child_dir}: not an embedded tiny-moe child (no moecap.json domain); give its data set "
                         "as CHILD=DATASET")
    name = dataset or f"tiny-{domain}"
    calib = domain_splits(domain)["validation"] if domain else stdlib_text(max_chars=400_000)
    return calib, load_text(name), name


@torch.inference_mode()
def measure_children(base_dir: str | Path, child_dirs: dict[str, str | Path], dtype: torch.dtype = torch.float32,
                     context: int = 256, calibration_windows: int = 8) -> tuple[Any, Any]:
    """(similarity, the base's per-expert sizes) of children of one base, each measured on the first
    ``calibration_windows`` windows of its own calibration text (see :func:`child_texts`): what
    :func:`make_plan` takes. The models are loaded on the CPU and released."""
    from transformers import AutoTokenizer

    from moecap.metrics.perplexity import windows as cut

    tok = AutoTokenizer.from_pretrained(base_dir)
    calib = {c: cut(tok(child_texts(Path(d))[0], add_special_tokens=False)["input_ids"], context, calibration_windows)
             for c, d in child_dirs.items()}
    base_model = _load(base_dir, "cpu", dtype)
    children = {c: _load(d, "cpu", dtype) for c, d in child_dirs.items()}
    return measure_similarity(base_model, children, calib), expert_sizes(base_model)
