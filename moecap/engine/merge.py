"""Model-merging baselines: several fine-tuned children of one base folded into ONE model.

The consolidation engine is compared against these classic weight-space merges. All of them work on
state dicts (name -> tensor, every input with the same names and shapes) and on *task vectors*
``tau_i = child_i - base`` (Ilharco et al., 2023):

* ``average``: the plain mean of the children's weights (a "model soup"; the base is not used).
* ``task_arithmetic``: ``base + scale * sum_i tau_i`` (Ilharco et al., 2023, "Editing models with task
  arithmetic").
* ``ties``: TIES-merging (Yadav et al., 2023): per tensor, each task vector is *trimmed* to its
  ``density`` fraction of largest magnitudes (the rest set to 0); a sign is *elected* per element, the
  sign of the sum of the trimmed values; the *disjoint mean* averages, per element, only the trimmed
  values that are non-zero and agree with the elected sign (an element whose elected sign is 0, or
  with no agreeing value, gets 0); the result is ``base + scale * disjoint_mean``.
* ``dare``: DARE (Yu et al., 2024, "Language models are Super Mario"): each task-vector element is
  dropped with probability ``drop`` and the survivors are rescaled by ``1 / (1 - drop)`` (so the
  expected task vector is unchanged); the sparsified vectors are then combined either by task
  arithmetic (``combine="arithmetic"``) or by TIES' sign election and disjoint mean
  (``combine="ties"``; DARE replaces TIES' magnitude trimming, there is no second trim).

Conventions:

* The scale defaults to 1.0 everywhere. For task arithmetic, ``1 / N`` would turn it into exactly the
  ``average`` method (``base + (1/N) sum_i (c_i - base) = mean_i c_i``), which is already offered, so
  the distinct baseline is the full *sum* of the task vectors; Ilharco et al. tune the scale on
  validation data in ``[0, 1]`` and 1.0 is the untuned end of that range; with 1.0 a single child is
  reproduced exactly. For TIES, Yadav et al. recommend 1.0 (the disjoint mean is already an average);
  DARE's rescaling keeps each vector's expectation, so 1.0 keeps the arithmetic meaning.
* Trimming keeps, per tensor, every element whose magnitude is at least the ``k``-th largest one, with
  ``k = ceil(density * numel)`` (at least one element; ties at the threshold are all kept, which makes
  the result independent of sort order; ``density = 1`` keeps everything).
* DARE's masks come from a ``torch.Generator`` (CPU) seeded from ``(seed, child index, tensor name)``
  through SHA-256: a tensor's result depends neither on the order tensors are processed in nor on the
  other tensors, so the pure functions and :func:`merge_models` agree exactly, on any device.
* Floating tensors are merged in float32 when stored in 16 or 8 bits, in float64 when stored in float32
  or float64 (see ``_work_dtype``: this makes a one-child merge at scale 1 exact), and stored back in
  the base's dtype; non-floating tensors (integer buffers, if any) are copied from the base.
* Memory: every function works one tensor at a time: it never builds all task vectors of a model at
  once. :func:`merge_models` reads one tensor of each input at a time (``safe_open``) and streams the
  result into the output file, so its peak memory is a few tensors, not a model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "MERGE_METHODS",
    "merge_average",
    "merge_dare",
    "merge_models",
    "merge_task_arithmetic",
    "merge_ties",
    "task_vectors",
]

COMBINES = ("arithmetic", "ties")


# ---------------------------------------------------------------------------------------- validation
def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must satisfy 0 < density <= 1, got {density!r}")


def _check_drop(drop: float) -> None:
    if not (isinstance(drop, (int, float)) and 0 <= drop < 1):
        raise ValueError(f"drop must satisfy 0 <= drop < 1, got {drop!r}")


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {combine!r}")


def _check_same_layout(reference: dict, others: Sequence[dict], ref_label: str, labels: Sequence[str]) -> None:
    """Same names and shapes everywhere, else a ValueError naming the first mismatching tensor and input."""
    ref_shapes = {k: tuple(v.shape) for k, v in reference.items()}
    for other, label in zip(others, labels):
        shapes = {k: tuple(v.shape) for k, v in other.items()}
        _compare_layouts(ref_shapes, shapes, ref_label, label)


def _compare_layouts(ref: dict[str, tuple], other: dict[str, tuple], ref_label: str, label: str) -> None:
    for name in sorted(set(ref) | set(other)):
        if name not in other:
            raise ValueError(f"tensor {name!r}: in {ref_label} but missing from {label}")
        if name not in ref:
            raise ValueError(f"tensor {name!r}: in {label} but missing from {ref_label}")
        if ref[name] != other[name]:
            raise ValueError(
                f"tensor {name!r}: shape {list(other[name])} in {label} differs from {list(ref[name])} in {ref_label}"
            )


def _need_children(children: Sequence[Any]) -> None:
    if len(children) == 0:
        raise ValueError("at least one child is needed")


# ---------------------------------------------------------------------------------- per-tensor math
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision: float32 for 16- and 8-bit floats, float64 for float32 and float64.

    The working type has more than twice the stored mantissa, so ``child - base`` is exact (for any two
    weights within a factor 2**13 of each other in half precision, 2**29 in float32) and so is
    ``base + (child - base)``: a single child merged at scale 1 comes back bit for bit, and rounding
    happens once, when the result is stored. In float32, float32 weights would not round-trip (measured
    on tiny-moe: about 6% of the elements one ulp off).
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _deltas(base: torch.Tensor, children: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Task vectors of one tensor, one at a time, in the working dtype on the base's device."""
    wd = _work_dtype(base.dtype)
    b = base.to(wd)
    for c in children:
        yield c.to(device=base.device, dtype=wd) - b


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the elements whose magnitude is at least the k-th largest (k = ceil(density * numel))."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, math.ceil(density * n))
    if k >= n:
        return delta
    mag = delta.abs().reshape(-1)
    # the k-th largest magnitude is the (n - k + 1)-th smallest
    threshold = torch.kthvalue(mag, n - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _disjoint_mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election (sign of the sum) and the mean of the non-zero values agreeing with it."""
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total += d
    elected = torch.sign(total)
    acc = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for d in deltas:
        agree = (torch.sign(d) == elected) & (d != 0)
        acc += torch.where(agree, d, torch.zeros_like(d))
        count += agree.to(count.dtype)
    return torch.where(count > 0, acc / count.clamp(min=1), torch.zeros_like(acc))


def _tensor_seed(seed: int, child: int, name: str) -> int:
    digest = hashlib.sha256(f"moecap-dare\0{seed}\0{child}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dare(delta: torch.Tensor, drop: float, seed: int, child: int, name: str) -> torch.Tensor:
    if drop == 0:
        return delta
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_tensor_seed(seed, child, name))
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32) >= drop  # P(keep) = 1 - drop
    keep = keep.to(delta.device)
    return torch.where(keep, delta / (1.0 - drop), torch.zeros_like(delta))


def _store(merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return merged.to(dtype=base.dtype)


def _t_average(name: str, base: torch.Tensor | None, children: Sequence[torch.Tensor]) -> torch.Tensor:
    ref = base if base is not None else children[0]
    wd = _work_dtype(ref.dtype)
    acc = torch.zeros(ref.shape, dtype=wd, device=ref.device)
    for c in children:
        acc += c.to(device=ref.device, dtype=wd)
    return _store(acc / len(children), ref)


def _t_task_arithmetic(name: str, base: torch.Tensor, children: Sequence[torch.Tensor], scale: float = 1.0):
    acc = torch.zeros(base.shape, dtype=_work_dtype(base.dtype), device=base.device)
    for d in _deltas(base, children):
        acc += d
    return _store(base.to(acc.dtype) + scale * acc, base)


def _t_ties(name: str, base: torch.Tensor, children: Sequence[torch.Tensor], density: float = 0.2,
            scale: float = 1.0):
    trimmed = [_trim(d, density) for d in _deltas(base, children)]
    merged = _disjoint_mean(trimmed)
    return _store(base.to(merged.dtype) + scale * merged, base)


def _t_dare(name: str, base: torch.Tensor, children: Sequence[torch.Tensor], drop: float = 0.9,
            scale: float = 1.0, seed: int = 0, combine: str = "arithmetic"):
    sparse = (_dare(d, drop, seed, i, name) for i, d in enumerate(_deltas(base, children)))
    if combine == "ties":
        merged = _disjoint_mean(list(sparse))
    else:
        merged = torch.zeros(base.shape, dtype=_work_dtype(base.dtype), device=base.device)
        for d in sparse:
            merged += d
    return _store(base.to(merged.dtype) + scale * merged, base)


# ------------------------------------------------------------------------------ state-dict functions
def task_vectors(base: dict, children: list[dict]) -> list[dict]:
    """``child - base`` per tensor, for every child, in the working precision (``_work_dtype``).

    Non-float tensors are not merged (merges copy them from the base): their task vector is zero.
    The merge functions never call this (they compute one tensor's task vectors at a time); it is for
    inspection of small models.
    """
    _check_same_layout(base, children, "base", [f"children[{i}]" for i in range(len(children))])
    out: list[dict] = []
    for child in children:
        tv = {}
        for name, b in base.items():
            if _is_float(b):
                tv[name] = next(iter(_deltas(b, [child[name]])))
            else:
                tv[name] = torch.zeros_like(b)
        out.append(tv)
    return out


def _merge_dicts(base: dict | None, children: list[dict], fn: Callable[..., torch.Tensor], **kw) -> dict:
    _need_children(children)
    labels = [f"children[{i}]" for i in range(len(children))]
    if base is None:
        _check_same_layout(children[0], children[1:], labels[0], labels[1:])
        ref = children[0]
    else:
        _check_same_layout(base, children, "base", labels)
        ref = base
    out = {}
    for name, r in ref.items():
        kids = [c[name] for c in children]
        out[name] = fn(name, base[name] if base is not None else None, kids, **kw) if _is_float(r) else r.clone()
    return out


def merge_average(children: list[dict]) -> dict:
    """The element-wise mean of the children's weights (stored in the first child's dtypes)."""
    return _merge_dicts(None, children, _t_average)


def merge_task_arithmetic(base: dict, children: list[dict], scale: float = 1.0) -> dict:
    """``base + scale * sum_i (child_i - base)``. Scale 1.0: see the module docstring."""
    _check_scale(scale)
    return _merge_dicts(base, children, _t_task_arithmetic, scale=scale)


def merge_ties(base: dict, children: list[dict], density: float = 0.2, scale: float = 1.0) -> dict:
    """TIES-merging: trim to ``density`` per tensor, elect signs, disjoint mean, ``base + scale * mean``."""
    _check_density(density)
    _check_scale(scale)
    return _merge_dicts(base, children, _t_ties, density=density, scale=scale)


def merge_dare(base: dict, children: list[dict], drop: float = 0.9, scale: float = 1.0, seed: int = 0,
               combine: str = "arithmetic") -> dict:
    """DARE: drop task-vector elements with probability ``drop``, rescale by ``1/(1-drop)``, then
    combine by task arithmetic (``"arithmetic"``) or TIES' sign election (``"ties"``). Seeded."""
    _check_drop(drop)
    _check_scale(scale)
    _check_combine(combine)
    return _merge_dicts(base, children, _t_dare, drop=drop, scale=scale, seed=int(seed), combine=combine)


MERGE_METHODS: dict[str, Callable[..., dict]] = {
    "average": merge_average,
    "task_arithmetic": merge_task_arithmetic,
    "ties": merge_ties,
    "dare": merge_dare,
}

_TENSOR_FNS = {"average": _t_average, "task_arithmetic": _t_task_arithmetic, "ties": _t_ties, "dare": _t_dare}
_CHECKS = {"density": _check_density, "drop": _check_drop, "scale": _check_scale, "combine": _check_combine}


def method_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate ``kwargs`` for ``method``; return them with every default filled in."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; allowed: {', '.join(MERGE_METHODS)}")
    params = {
        n: p.default
        for n, p in inspect.signature(MERGE_METHODS[method]).parameters.items()
        if n not in ("base", "children")
    }
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        allowed = ", ".join(params) or "none"
        raise ValueError(f"merge method {method!r} takes no {', '.join(unknown)} (its options: {allowed})")
    full = {**params, **kwargs}
    for n, v in full.items():
        if n in _CHECKS:
            _CHECKS[n](v)
    if "seed" in full:
        full["seed"] = int(full["seed"])
    return full


# -------------------------------------------------------------------------------- model directories
_WEIGHT_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _Weights:
    """The tensors of one model directory (one or several ``*.safetensors`` shards), read lazily."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"{self.dir} is not a model directory")
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.dir} holds no *.safetensors weights")
        index = self.dir / _WEIGHT_INDEX
        if index.is_file():  # a sharded checkpoint: only the shards its index names
            wanted = set(json.loads(index.read_text())["weight_map"].values())
            files = [f for f in files if f.name in wanted]
        self._handles = {}
        self.where: dict[str, Path] = {}
        self.shape: dict[str, tuple] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for f in files:
            h = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h
            for name in h.keys():
                if name in self.where:
                    raise ValueError(
                        f"tensor {name!r} is in two shards of {self.dir}: {self.where[name].name}, {f.name}"
                    )
                sl = h.get_slice(name)
                self.where[name] = f
                self.shape[name] = tuple(sl.get_shape())
                code = sl.get_dtype()
                if code not in _ST_NAMES:
                    raise ValueError(f"tensor {name!r} in {f}: unsupported dtype {code}")
                self.dtype[name] = _ST_NAMES[code]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)

    def label(self, name: str | None = None) -> str:
        if name is not None and name in self.where:
            return str(self.where[name])
        return str(self.dir)


def _check_model_layouts(base: _Weights, children: Sequence[_Weights]) -> None:
    for child in children:
        for name in sorted(set(base.shape) | set(child.shape)):
            if name not in child.shape:
                raise ValueError(f"tensor {name!r}: in {base.label(name)} but missing from {child.label()}")
            if name not in base.shape:
                raise ValueError(f"tensor {name!r}: in {child.label(name)} but missing from {base.label()}")
            if base.shape[name] != child.shape[name]:
                raise ValueError(
                    f"tensor {name!r}: shape {list(child.shape[name])} in {child.label(name)} differs from "
                    f"{list(base.shape[name])} in {base.label(name)}"
                )


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _write_safetensors_stream(path: Path, names: list[str], shapes: dict, dtypes: dict,
                              produce: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file whose layout is known in advance, producing one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first; each tensor's bytes follow as soon as
    it is produced, so only one output tensor is ever held. Written to a temporary name in the same
    folder, fsynced, then renamed over ``path``. Returns the file size in bytes.
    """
    # the order the safetensors library itself uses: larger elements first, so every tensor stays aligned
    order = sorted(names, key=lambda n: (-torch.empty((), dtype=dtypes[n]).element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for n in order:
        size = math.prod(shapes[n]) * torch.empty((), dtype=dtypes[n]).element_size()
        header[n] = {"dtype": _ST_DTYPES[dtypes[n]], "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for n in order:
                t = produce(n)
                if tuple(t.shape) != tuple(shapes[n]) or t.dtype != dtypes[n]:
                    raise RuntimeError(f"tensor {n!r}: produced {t.dtype} {list(t.shape)}, expected "
                                       f"{dtypes[n]} {list(shapes[n])}")
                fh.write(_tensor_bytes(t))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def _copy_model_files(src: Path, dst: Path) -> list[str]:
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json")
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in ("config.json", "generation_config.json") or f.name in _TOKENIZER_FILES
                            or f.suffix == ".py"):  # .py: remote-code models need their modeling files
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def merge_models(base_dir, child_dirs: list, method: str, out_dir, **kwargs) -> dict:
    """Merge the children of ``base_dir`` into one Hugging Face model directory ``out_dir``.

    Reads the inputs' safetensors weights one tensor at a time, merges each with ``method`` (a key of
    :data:`MERGE_METHODS`; ``kwargs`` are that method's options), streams the result into
    ``out_dir/model.safetensors`` (temporary name, then rename), copies config, generation config and
    tokenizer files from the base, writes ``out_dir/merge.json`` and returns the same summary.
    """
    t0 = time.perf_counter()
    full = method_kwargs(method, kwargs)
    base_path = Path(base_dir).resolve()
    child_paths = [Path(c).resolve() for c in child_dirs]
    _need_children(child_paths)
    out = Path(out_dir).resolve()
    if out == base_path or out in child_paths:
        raise ValueError(f"the output directory {out} is one of the inputs")
    base = _Weights(base_path)
    children = [_Weights(c) for c in child_paths]
    _check_model_layouts(base, children)
    if out.is_dir():
        stale = [f.name for f in out.iterdir() if f.name != "model.safetensors"
                 and (f.suffix == ".safetensors" or f.name == _WEIGHT_INDEX)]
        if stale:
            raise ValueError(f"{out} already holds other weights ({', '.join(sorted(stale))}); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)

    fn = _TENSOR_FNS[method]
    names = sorted(base.shape)
    counts = {"merged": 0, "copied": 0, "parameters": 0}

    def produce(name: str) -> torch.Tensor:
        b = base.get(name)
        counts["parameters"] += b.numel()
        if not b.is_floating_point():
            counts["copied"] += 1
            return b
        kids = [c.get(name) for c in children]
        counts["merged"] += 1
        return fn(name, b, kids, **full)

    summary: dict[str, Any] = {
        "method": method,
        "kwargs": full,
        "base": str(base_path),
        "children": [str(c) for c in child_paths],
        "out_dir": str(out),
    }
    metadata = {"format": "pt", "moecap_merge": json.dumps({k: summary[k] for k in ("method", "kwargs")})}
    copied = _copy_model_files(base_path, out)
    size = _write_safetensors_stream(out / "model.safetensors", names, base.shape, base.dtype, produce, metadata)
    summary.update({
        "tensors_merged": counts["merged"],
        "tensors_copied": counts["copied"],
        "parameters": counts["parameters"],
        "bytes": size,
        "files_copied": copied,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    from moecap.paths import atomic_write_text

    atomic_write_text(out / "merge.json", json.dumps(summary, indent=2) + "\n")
    return summary
