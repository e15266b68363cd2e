"""Expert tracing on real transformers 5 MoE modules of every supported family."""

import pytest
import torch
from torch import nn

from moecap.metrics.accounting import from_hf_config
from moecap.runners.tracing import ExpertTracer, find_moe_blocks
from test_accounting import TINY  # tiny configs of every family, checked against real modules there

MOE_FAMILIES = sorted(f for f, cfg in TINY.items() if from_hf_config(cfg).moe_layers)


def _build(cfg):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**cfg)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _reference_counts(model, ids):
    """Route independently: capture each MoE block's input, call its router again, count its top-k."""
    inputs = {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, layer=layer: inputs.__setitem__(layer, a[0]))
        for layer, block in find_moe_blocks(model)
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = []
    for layer, block in find_moe_blocks(model):
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        x = inputs[layer].reshape(-1, inputs[layer].shape[-1])
        with torch.no_grad():
            idx = router(x)[-1]
        out.append(torch.bincount(idx.reshape(-1), minlength=router.weight.shape[0]).tolist())
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_traced_counts_match_independent_routing(family):
    cfg = TINY[family]
    model = _build(cfg)
    acc = from_hf_config(cfg)
    tracer = ExpertTracer(model).attach()
    assert tracer.layers == acc.moe_layers
    ids = torch.randint(1, cfg["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(1))
    tracer.begin_pass()
    with torch.no_grad():
        model(ids)
    counts = tracer.end_pass()
    assert counts is not None and len(counts) == len(acc.moe_layers)
    for row, layer in zip(counts, acc.moe_layers):
        spec = acc.layers[layer]
        assert len(row) == spec.n_experts
        assert sum(row) == 3 * 7 * spec.top_k  # every token runs top-k experts
    assert counts == _reference_counts(model, ids)
    assert tracer.method == "experts-input"
    tracer.detach()


def test_inactive_tracer_records_nothing_and_detach_removes_hooks():
    model = _build(TINY["mixtral"])
    tracer = ExpertTracer(model).attach()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert tracer.end_pass() is None  # no pass begun: nothing kept
    tracer.detach()
    for _, b in tracer.blocks:  # the model is as it was: no wrapper, no hook
        assert "forward" not in b.experts.__dict__ and not b.experts._forward_pre_hooks
        assert not b.gate._forward_hooks


def test_the_router_fallback_is_dropped_once_the_experts_give_the_indices():
    """Tracing costs per decode pass: the experts' forward is wrapped (no hook dispatch), and the
    router hooks, a fallback for layouts that call experts without indices, go after the first pass
    that did not need them (issue 21: tracing overhead under 1 %)."""
    model = _build(TINY["qwen2_moe"])
    tracer = ExpertTracer(model).attach()
    assert all(b.gate._forward_hooks for _, b in tracer.blocks)  # until a pass shows the experts suffice
    assert all(not b.experts._forward_pre_hooks for _, b in tracer.blocks)  # never a hook on the experts
    ids = torch.tensor([[3, 4, 5, 6]])
    tracer.begin_pass()
    with torch.no_grad():
        model(ids)
    first = tracer.end_pass()
    assert all(not b.gate._forward_hooks for _, b in tracer.blocks)
    tracer.detach()
    tracer.attach()  # attached again (as the benchmark does per pass): still no router hook
    assert all(not b.gate._forward_hooks for _, b in tracer.blocks)
    tracer.begin_pass()
    with torch.no_grad():
        model(ids)
    assert tracer.end_pass() == first == _reference_counts(model, ids)
    tracer.detach()


def test_deferred_passes_flush_in_order():
    model = _build(TINY["olmoe"])
    tracer = ExpertTracer(model).attach()
    expected = []
    with torch.no_grad():
        for n in (5, 1, 1, 3):  # two shapes: grouped separately, returned in pass order
            ids = torch.randint(1, 100, (1, n), generator=torch.Generator().manual_seed(n))
            tracer.begin_pass()
            model(ids)
            expected.append(tracer.end_pass())
            tracer.begin_pass()
            model(ids)
            assert tracer.end_pass(defer=True) is None
    assert tracer.flush() == expected
    assert tracer.flush() == []


def test_flush_counts_out_of_range_ids_in_no_expert():
    """Padding (-1) and sentinels past the last expert are counted for no expert, in the one-shape fast
    path and in the grouped one; a pass that was not fully traced stays None."""
    model = _build(TINY["olmoe"])
    tracer = ExpertTracer(model)
    n_layer, n_exp = len(tracer.blocks), tracer.num_experts[0]
    ids = torch.tensor([[0, n_exp - 1], [-1, n_exp], [n_exp + 5, 1]])
    want = [0] * n_exp
    want[0] += 1
    want[n_exp - 1] += 1
    want[1] += 1
    for pending, expected in (
        ([[ids] * n_layer, [ids] * n_layer], [[want] * n_layer] * 2),
        ([[ids] * n_layer, None, [ids[:1]] * n_layer], [[want] * n_layer, None, [[1] + [0] * (n_exp - 2) + [1]] * n_layer]),
    ):
        tracer._pending = pending
        assert tracer.flush() == expected


class _LogitsRouter(nn.Module):
    """An older layout: the router returns logits only, the experts get dense routing weights."""

    def __init__(self, h, e):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(e, h))

    def forward(self, x):
        return x @ self.weight.T


class _DenseExperts(nn.Module):
    num_experts = 4

    def forward(self, x, weights):
        return x * weights.sum(-1, keepdim=True)


class _Block(nn.Module):
    top_k = 2

    def __init__(self):
        super().__init__()
        self.gate = _LogitsRouter(8, 4)
        self.experts = _DenseExperts()

    def forward(self, x):
        logits = self.gate(x)
        top = torch.topk(logits, 2, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        return self.experts(x, weights)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _Block()


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer.mlp(x)
        return x


def test_router_logits_fallback():
    torch.manual_seed(0)
    model = _Toy()
    tracer = ExpertTracer(model).attach()
    x = torch.randn(6, 8)
    tracer.begin_pass()
    model(x)
    counts = tracer.end_pass()
    assert tracer.method == "router-logits top-k"
    expected = torch.bincount(torch.topk(model.layers[0].mlp.gate(x), 2).indices.reshape(-1), minlength=4).tolist()
    assert counts[0] == expected and sum(counts[1]) == 12
