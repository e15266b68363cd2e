"""The engine's linear kernels: one object per weight matrix, repacked once at load for the kernel that
runs it, with its exact stored bytes (S-MBU counts them) and the name of the kernel.

Which kernel runs a matrix (``make_linear``):

============  ================================================  ==========================================
precision     kernel (``Linear.kernel``)                        stored as
============  ================================================  ==========================================
full          ``onednn`` on a CPU for matrices large enough     oneDNN's pre-packed layout of the weight
              to gain (``torch.ops.mkldnn._linear_pointwise``,  (``mkldnn._reorder_linear_weight``); the
              the packed path torch's own CPU compiler uses),   weight itself (CUDA, small matrices)
              else ``aten.linear``
int8          ``aten._weight_int8pack_mm`` (CPU and CUDA)       int8 ``[N, K]`` + one scale per row, in
                                                                the compute dtype
int4          ``aten._weight_int4pack_mm_for_cpu`` (CPU) /      torch's int4 tile layout (``[N, K/2]``
              ``aten._weight_int4pack_mm`` (CUDA, tinygemm)     bytes) + ``[K/G, N, 2]`` scale and offset
int3, int2    ``dequant``: the weight is dequantized on every   moecap's bit-packed codes
              call (no fused kernel exists for these widths);   (:mod:`moecap.engine.quant`)
              also any int8/int4 matrix whose shape or group
              the fused kernels do not take
============  ================================================  ==========================================

The fused low-bit kernels take activations in a 16-bit *compute dtype* (:func:`compute_dtype`): bfloat16
where the device has a fast path for it (a CPU with AVX512-BF16 or AMX, a CUDA GPU of compute capability
>= 8.0); elsewhere they are slow (fed float32 activations they ran ~50x slower than a float32 matmul
on the development CPU) and the engine falls back to ``dequant`` in the model's dtype. ``Linear.__call__`` takes and returns the dtype named
by ``Linear.act_dtype``.

Mapping moecap's format onto torch's kernels (exact, no re-quantization):

- int8: moecap's symmetric codes are offset-binary (``code = q + 128``), so the kernel's int8 weight is
  ``code - 128`` and its per-row scale is the stored scale. The kernel takes one scale per row, so int8
  experts are quantized per output channel (``group_size = in_features``).
- int4: moecap's ``w ~ (code - z) * s`` becomes the kernel's ``w ~ (code - 8) * s + m`` with
  ``m = (8 - z) * s``; ``[K/G, N, 2]`` holds ``(s, m)`` per group.

Scales are quantized on the bfloat16 grid (:func:`moecap.engine.quant.quantize` with
``scale_grid="bfloat16"``: every bfloat16 in float16's range is also a float16, so moecap's float16
storage holds them exactly) and the kernel's scales equal the stored ones; the int4 offset ``m`` is
rounded to bfloat16, which adds at most ``|m| * 2**-9 <= s / 64`` to an element's error
(:meth:`Linear.max_abs_error_bound`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from moecap.engine.quant import QuantizedTensor

KERNEL_NAMES = {
    "onednn": "torch.ops.mkldnn._linear_pointwise (oneDNN, pre-packed weight)",
    "aten.linear": "torch.nn.functional.linear",
    "int8pack": "torch.ops.aten._weight_int8pack_mm",
    "int4pack-cpu": "torch.ops.aten._weight_int4pack_mm_for_cpu",
    "int4pack-cuda": "torch.ops.aten._weight_int4pack_mm",
    "int4pack-cuda|dequant": "torch.ops.aten._weight_int4pack_mm once copied to the GPU; dequantize when computed by the host",
    "dequant": "moecap dequantize-on-the-fly + torch.nn.functional.linear",
}

INT4_GROUPS = (32, 64, 128, 256)
# a matrix below this many bytes runs through aten.linear even on a CPU with oneDNN: the packed call's
# fixed cost (~12 us) exceeds what it saves on a matrix that stays in cache
ONEDNN_MIN_BYTES = 1 << 20


# ------------------------------------------------------------------------------------- capabilities
@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16), w, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def fused_kernel_works(kind: str, device_type: str) -> bool:
    """Whether torch's fused ``int8`` / ``int4`` weight-only kernel runs on ``device_type`` in this build
    (private operators whose signatures have moved between releases: probed once, never assumed)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    dev = torch.device(device_type)
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16, device=dev)
        if kind == "int8":
            w = torch.ones(16, 64, dtype=torch.int8, device=dev)
            y = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(16, dtype=torch.bfloat16, device=dev))
        elif device_type == "cpu":
            codes = torch.full((16, 64), 9, dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([torch.ones(2, 16), torch.zeros(2, 16)], -1).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        else:
            nib = torch.full((16, 32), 0x99, dtype=torch.uint8, device=dev)
            sz = torch.stack([torch.ones(2, 16), torch.zeros(2, 16)], -1).to(torch.bfloat16).to(dev)
            y = torch.ops.aten._weight_int4pack_mm(x, _cuda_pack(nib), 32, sz)
        return bool(torch.allclose(y.float().cpu(), torch.full((1, 16), 64.0)))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def compute_dtype(device: torch.device | str) -> torch.dtype | None:
    """The activation dtype the fused low-bit kernels run in on ``device``; None where they have no fast
    path (a CPU without BF16, a GPU below compute capability 8.0): quantized weights then dequantize."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else None
    return None


# ------------------------------------------------------------------------------------------ kernels
class Linear:
    """``y = x @ W.T`` for one stored weight. ``act_dtype``: the dtype ``__call__`` takes and returns."""

    kernel: str = ""
    precision: str = "full"
    act_dtype: torch.dtype
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:
        """Exact bytes the weight occupies as stored (what a pass that uses it reads)."""
        raise NotImplementedError

    def storage_nbytes(self) -> int:
        """The bytes of the storages behind the kept tensors, read from the tensors themselves (oneDNN's
        own size for its packed layout): a check on :meth:`nbytes`."""
        return sum(_storage_bytes(t) for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Linear":
        raise NotImplementedError

    def pin_memory(self) -> "Linear":
        return self

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def max_abs_error_bound(self) -> float:
        """The largest |w_stored - w| the stored form allows for any element (0 at full precision)."""
        return 0.0


class DenseLinear(Linear):
    """A full-precision weight; on a CPU, large matrices are pre-packed for oneDNN."""

    precision = "full"

    def __init__(self, weight: torch.Tensor, pack: bool | None = None):
        self.out_features, self.in_features = weight.shape
        self.act_dtype = weight.dtype
        self.weight = weight.detach()
        self._packed: torch.Tensor | None = None
        if pack is None:
            pack = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                    and weight.numel() * weight.element_size() >= ONEDNN_MIN_BYTES and onednn_available()
                    and (weight.dtype == torch.float32 or cpu_has_fast_bf16()))
        if pack:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous())
            self.weight = None  # the packed copy is the only one kept
        self.kernel = "onednn" if self._packed is not None else "aten.linear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return F.linear(x, self.weight)

    def dense(self) -> torch.Tensor:
        """The weight as an ordinary tensor (oneDNN reorders its packed layout back, exactly)."""
        if self._packed is not None:
            return self._packed.to_dense()
        return self.weight

    def nbytes(self) -> int:
        if self._packed is not None:
            return int(torch.ops.mkldnn._nbytes(self._packed))
        return self.weight.numel() * self.weight.element_size()

    def _tensors(self) -> list[torch.Tensor]:
        return [self._packed if self._packed is not None else self.weight]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DenseLinear":
        device = torch.device(device)
        if device == self.device:
            return self
        return DenseLinear(self.dense().to(device, non_blocking=non_blocking), pack=False if device.type != "cpu" else None)

    def pin_memory(self) -> "DenseLinear":
        if not torch.cuda.is_available() or self._packed is not None:
            return self
        out = DenseLinear(self.weight.pin_memory(), pack=False)
        return out

    @property
    def device(self) -> torch.device:
        return self._packed.device if self._packed is not None else self.weight.device


class DequantLinear(Linear):
    """moecap's bit-packed codes, dequantized into the activation dtype on every call."""

    kernel = "dequant"

    def __init__(self, q: QuantizedTensor, act_dtype: torch.dtype):
        self.q = q
        self.out_features, self.in_features = q.shape
        self.act_dtype = act_dtype
        self.precision = f"int{q.bits}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.q.dequantize(x.dtype))

    def nbytes(self) -> int:
        return self.q.nbytes()

    def _tensors(self) -> list[torch.Tensor]:
        return [self.q.packed, self.q.scale] + ([self.q.zero] if self.q.zero is not None else [])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DequantLinear":
        return DequantLinear(self.q.to(device, non_blocking=non_blocking), self.act_dtype)

    def pin_memory(self) -> "DequantLinear":
        return DequantLinear(self.q.pin_memory(), self.act_dtype)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def max_abs_error_bound(self) -> float:
        return float(self.q.scale.float().max()) / 2 if self.q.scale.numel() else 0.0


class Int8Linear(Linear):
    """``aten._weight_int8pack_mm``: int8 weight ``[N, K]``, one scale per row, 16-bit activations."""

    kernel = "int8pack"
    precision = "int8"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bound: float):
        self.weight, self.scales = weight, scales
        self.out_features, self.in_features = weight.shape
        self.act_dtype = scales.dtype
        self._bound = bound

    @classmethod
    def supports(cls, q: QuantizedTensor, act_dtype: torch.dtype | None) -> bool:
        return (act_dtype is not None and q.bits == 8 and q.symmetric and q.group_size == q.shape[1]
                and bool(torch.equal(q.scale.to(act_dtype).to(q.scale.dtype), q.scale))
                and fused_kernel_works("int8", q.device.type))

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, act_dtype: torch.dtype) -> "Int8Linear":
        codes = q.codes().to(torch.int16) - 128  # offset-binary -> signed
        bound = float(q.scale.float().max()) / 2 if q.scale.numel() else 0.0
        return cls(codes.to(torch.int8).contiguous(), q.scale.reshape(-1).to(act_dtype).contiguous(), bound)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        return y.reshape(*shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def _tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scales]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Int8Linear":
        return Int8Linear(self.weight.to(device, non_blocking=non_blocking),
                          self.scales.to(device, non_blocking=non_blocking), self._bound)

    def pin_memory(self) -> "Int8Linear":
        if not torch.cuda.is_available():
            return self
        return Int8Linear(self.weight.pin_memory(), self.scales.pin_memory(), self._bound)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def max_abs_error_bound(self) -> float:
        return self._bound


class Int4Linear(Linear):
    """torch's int4 weight-only matmul (tinygemm layout). ``layout``: ``cpu`` (packed for
    ``_weight_int4pack_mm_for_cpu``), ``cuda`` (packed for ``_weight_int4pack_mm``) or ``nibbles`` (two
    codes a byte, first code in the high nibble, ``[N, K/2]``: the device-neutral form a host expert keeps
    when it is copied to a GPU, repacked there by ``_convert_weight_to_int4pack``)."""

    precision = "int4"

    def __init__(self, packed: torch.Tensor, scale_and_offset: torch.Tensor, group_size: int, shape: tuple[int, int],
                 layout: str, bound: float):
        self.packed, self.sz = packed, scale_and_offset
        self.group_size = group_size
        self.out_features, self.in_features = shape
        self.layout = layout
        self.act_dtype = scale_and_offset.dtype
        self._bound = bound
        # nibbles: torch's CUDA kernel once copied to the GPU; computed by the host, dequantize
        self.kernel = {"cpu": "int4pack-cpu", "cuda": "int4pack-cuda", "nibbles": "int4pack-cuda|dequant"}[layout]

    @classmethod
    def supports(cls, q: QuantizedTensor, act_dtype: torch.dtype | None, device: torch.device) -> bool:
        if act_dtype is None or q.bits != 4 or q.group_size not in INT4_GROUPS:
            return False
        n, k = q.shape
        if device.type == "cpu":
            return n % 16 == 0 and k % q.group_size == 0 and k % 2 == 0 and fused_kernel_works("int4", "cpu")
        if device.type == "cuda":  # tinygemm: k in whole 2-tile blocks (innerKTiles 2 x 16), n in 8-row tiles
            return (n % 8 == 0 and k % 32 == 0 and act_dtype == torch.bfloat16 and torch.cuda.is_available()
                    and fused_kernel_works("int4", "cuda"))
        return False

    @staticmethod
    def _scale_and_offset(q: QuantizedTensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        s = q.scale.float()
        z = q.zero.float() if q.zero is not None else torch.full_like(s, 8.0)
        m = (8.0 - z) * s
        m_k = m.to(act_dtype)
        # the stored codes were rounded against (s, z); the kernel adds its rounded offset
        bound = float((s / 2 + (m_k.float() - m).abs()).max()) if s.numel() else 0.0
        sz = torch.stack([s.to(act_dtype), m_k], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
        return sz, bound

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, act_dtype: torch.dtype, device: torch.device,
                       layout: str | None = None) -> "Int4Linear":
        device = torch.device(device)
        layout = layout or device.type
        sz, bound = cls._scale_and_offset(q, act_dtype)
        codes = q.codes().to(device)
        if layout == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        else:
            nib = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
            packed = nib if layout == "nibbles" else _cuda_pack(nib)
        return cls(packed, sz.to(device), q.group_size, q.shape, layout, bound)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.layout == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.sz)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.sz)
        elif self.packed.device.type == "cuda":  # nibbles that reached the GPU: repack where they lie
            y = torch.ops.aten._weight_int4pack_mm(x2, _cuda_pack(self.packed), self.group_size, self.sz)
        else:  # a host expert computed by the host: torch's CPU kernel takes another layout, dequantize
            y = F.linear(x2, self.dequantize(x2.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight [N, K] of the ``nibbles`` layout: ``(code - 8) * s + m`` per group."""
        if self.layout != "nibbles":
            raise ValueError(f"only the nibbles layout dequantizes here, not {self.layout!r}")
        n, k = self.out_features, self.in_features
        codes = torch.stack([self.packed >> 4, self.packed & 0xF], dim=-1).reshape(n, k).float()
        s = self.sz[..., 0].float().T.repeat_interleave(self.group_size, dim=1)
        m = self.sz[..., 1].float().T.repeat_interleave(self.group_size, dim=1)
        return ((codes - 8) * s + m).to(dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * self.sz.element_size()

    def _tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.sz]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Int4Linear":
        device = torch.device(device)
        if device == self.device:
            return self
        if self.layout == "nibbles" and device.type == "cuda":
            packed = _cuda_pack(self.packed.to(device, non_blocking=non_blocking))
            return Int4Linear(packed, self.sz.to(device, non_blocking=non_blocking), self.group_size,
                              (self.out_features, self.in_features), "cuda", self._bound)
        raise ValueError(f"an int4 weight in the {self.layout!r} layout cannot move to {device}")

    def pin_memory(self) -> "Int4Linear":
        if not torch.cuda.is_available():
            return self
        return Int4Linear(self.packed.pin_memory(), self.sz.pin_memory(), self.group_size,
                          (self.out_features, self.in_features), self.layout, self._bound)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def max_abs_error_bound(self) -> float:
        return self._bound


def _storage_bytes(t: torch.Tensor) -> int:
    if t.is_mkldnn:
        return int(torch.ops.mkldnn._nbytes(t))
    return t.untyped_storage().nbytes()


def _cuda_pack(nibbles: torch.Tensor) -> torch.Tensor:
    k = nibbles.shape[1] * 2
    inner = 8 if k % 128 == 0 else (4 if k % 64 == 0 else 2)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, inner)


# ------------------------------------------------------------------------------------------ factory
def make_linear(weight: torch.Tensor | QuantizedTensor, device: torch.device | str, *,
                act_dtype: torch.dtype | None = None, movable: bool = False) -> Linear:
    """The kernel object for one weight on ``device``.

    ``weight``: a full-precision tensor or a :class:`QuantizedTensor`. ``act_dtype``: the compute dtype
    of the fused low-bit kernels on the device that will compute with it (:func:`compute_dtype`; None:
    quantized weights dequantize). ``movable``: the weight lives in host memory and may be copied to a
    GPU (int4 keeps the device-neutral ``nibbles`` layout, full precision stays an ordinary tensor).
    """
    device = torch.device(device)
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to(device)
        if not w.is_contiguous() or w.untyped_storage().nbytes() != w.numel() * w.element_size():
            w = w.contiguous().clone()  # own storage: a slice would keep a whole fused tensor alive
        return DenseLinear(w, pack=False if movable else None)
    q = weight.to(device)
    if Int8Linear.supports(q, act_dtype):
        return Int8Linear.from_quantized(q, act_dtype)
    target = torch.device("cuda") if movable else device
    if Int4Linear.supports(q, act_dtype, target):
        return Int4Linear.from_quantized(q, act_dtype, device, layout="nibbles" if movable else None)
    return DequantLinear(q, q.dtype)  # no fused kernel: dequantize into the model's dtype


def kernel_summary(linears: Any) -> dict[str, dict[str, Any]]:
    """Per precision: which kernels ran its matrices (name -> count, and the operator each name is) and
    the activation dtype they computed in."""
    out: dict[str, dict[str, Any]] = {}
    for lin in linears:
        row = out.setdefault(lin.precision, {"kernels": {}, "ops": {},
                                             "act_dtype": str(lin.act_dtype).removeprefix("torch.")})
        row["kernels"][lin.kernel] = row["kernels"].get(lin.kernel, 0) + 1
        row["ops"][lin.kernel] = KERNEL_NAMES.get(lin.kernel, lin.kernel)
    return out
