"""Group-wise weight-only quantization of expert weights, with a dequantize-on-the-fly matmul.

A 2-D weight ``w`` of shape ``[out, in]`` is cut, row by row, into groups of ``group_size`` consecutive
input columns; each group gets its own float16 scale (and, when asymmetric, a float16 zero point), and
each weight becomes an unsigned integer code of ``bits`` bits, rounded to the nearest grid point.

Grids (``Q = 2**bits - 1``, ``H = 2**(bits-1)``):

* symmetric: ``scale = absmax / (H - 1)``; signed codes in ``[-(H-1), H-1]`` are stored offset-binary
  (``code = q + H``, so code 0 is never used); ``w ~ (code - H) * scale``.
* asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``, ``scale = (hi - lo) / Q``,
  ``zero = -lo / scale`` (a float zero point in ``[0, Q]``); ``w ~ (code - zero) * scale``.
  The range is widened to include 0 (as GPTQ does) so that the zero point always fits float16
  exactly enough; for weight groups, which straddle 0, this changes nothing.

Scales and zeros are stored in float16 and the codes are computed *with the stored values*: the scale
is rounded up to the next float16 (never down, so the grid still covers the group) and the codes are
``round(w / scale16 [+ zero16])``. The error of every element is then at most ``scale16 / 2``.
An all-zero group stores scale 0 (and zero 0) and dequantizes to exact zeros.

Packing (``_pack_codes``), per row, little-endian within a block of ``8 // gcd(bits, 8)`` codes:

* 8 bits: one code per byte;
* 4 bits: two codes per byte, the first in the low nibble;
* 2 bits: four codes per byte, the first in the two lowest bits;
* 3 bits: eight codes in three bytes: the 24-bit integer ``sum(code_k << 3k)`` stored low byte first.

When ``in_features`` is not a multiple of the block (odd ``in`` at 4 bits, ``in % 4`` at 2 bits,
``in % 8`` at 3 bits), each row is padded with zero codes to a whole block. The padding is real
storage: ``nbytes()`` and ``expected_nbytes()`` count it.

All arithmetic is float32 whatever the weight dtype; everything is vectorised torch and runs on CPU
and CUDA tensors alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits} is not supported: allowed values are {', '.join(map(str, ALLOWED_BITS))}")


def _check_group_size(group_size: int, in_features: int) -> None:
    if group_size <= 0:
        raise ValueError(
            f"group_size={group_size} is not allowed: it must be a positive divisor of in_features={in_features}"
        )
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features} "
            f"({in_features} % {group_size} = {in_features % group_size})"
        )


def _block(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing block: 8 → (1, 1), 4 → (2, 1), 2 → (4, 1), 3 → (8, 3)."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def _packed_row_bytes(in_features: int, bits: int) -> int:
    codes, nbytes = _block(bits)
    return -(-in_features // codes) * nbytes


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack unsigned ``bits``-bit codes ``[rows, n]`` (any integer dtype) into uint8 ``[rows, bytes]``.

    Rows are padded with zero codes to a whole block (see the module docstring for the layout).
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, n], got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    per_block, bytes_per_block = _block(bits)
    pad = -n % per_block
    c = codes.to(torch.int32)
    if pad:
        c = F.pad(c, (0, pad))
    c = c.reshape(rows, -1, per_block)
    code_shifts = torch.arange(per_block, device=c.device, dtype=torch.int32) * bits
    # the codes of a block occupy disjoint bits, so their sum is their bitwise or (at most 24 bits)
    value = torch.bitwise_left_shift(c, code_shifts).sum(dim=-1, dtype=torch.int32)
    byte_shifts = torch.arange(bytes_per_block, device=c.device, dtype=torch.int32) * 8
    out = torch.bitwise_right_shift(value.unsqueeze(-1), byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(rows, -1).contiguous()


def _unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``_pack_codes``: uint8 ``[rows, bytes]`` → uint8 codes ``[rows, n]`` (padding dropped)."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [rows, bytes], got shape {tuple(packed.shape)}")
    rows = packed.shape[0]
    per_block, bytes_per_block = _block(bits)
    if packed.shape[1] != _packed_row_bytes(n, bits):
        raise ValueError(
            f"{packed.shape[1]} packed bytes per row do not hold {n} codes of {bits} bits "
            f"(expected {_packed_row_bytes(n, bits)})"
        )
    if bits == 8:  # one code per byte
        return packed[:, :n]
    if bits in (4, 2):  # whole codes per byte, first code in the lowest bits: shifts, no int32 detour
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = torch.bitwise_right_shift(packed.unsqueeze(-1), shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, -1)[:, :n]
    b = packed.to(torch.int32).reshape(rows, -1, bytes_per_block)
    byte_shifts = torch.arange(bytes_per_block, device=b.device, dtype=torch.int32) * 8
    value = torch.bitwise_left_shift(b, byte_shifts).sum(dim=-1, dtype=torch.int32)
    code_shifts = torch.arange(per_block, device=b.device, dtype=torch.int32) * bits
    codes = torch.bitwise_right_shift(value.unsqueeze(-1), code_shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x >= 0`` → the smallest ``dtype`` (float16 or bfloat16) value that is ``>= x``."""
    h = x.to(dtype)
    low = h.float() < x
    # for non-negative finite 16-bit floats, the next representable value up is the next bit pattern
    bumped = (h.view(torch.int16) + 1).view(dtype)
    return torch.where(low, bumped, h)


def _to_fp16_round_up(x: torch.Tensor, grid: str = "float16") -> torch.Tensor:
    """float32 ``x >= 0`` → the smallest float16 that is ``>= x`` (ValueError if that overflows).

    ``grid="bfloat16"``: the smallest value ``>= x`` that float16 *and* bfloat16 both hold exactly (so
    that kernels taking bfloat16 scales use the stored scale itself); alternating round-ups reach it
    in a few steps, since each only raises the value and powers of two lie on both grids."""
    h = _round_up(x, torch.float16)
    if grid == "bfloat16":
        for _ in range(8):
            b = _round_up(h.float(), torch.bfloat16).float()
            if bool((b == h.float()).all()):
                break
            h = _round_up(b, torch.float16)
        else:  # pragma: no cover - the alternation settles in 2-3 steps
            raise ValueError("could not put scales on both the float16 and the bfloat16 grid")
    elif grid != "float16":
        raise ValueError(f"scale_grid={grid!r}: allowed float16, bfloat16")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("weights are non-finite or too large for float16 scales (|w| beyond ~65504 per step)")
    return h


@dataclass
class QuantizedTensor:
    """A group-wise quantized 2-D weight; see the module docstring for grids and packing."""

    bits: int  # 8, 4, 3 or 2
    group_size: int  # weights per group along the input (last) dimension
    shape: tuple[int, int]  # (out_features, in_features) of the original 2-D weight
    dtype: torch.dtype  # the original weight dtype (dequantize returns it unless told otherwise)
    packed: torch.Tensor  # uint8 codes, bit-packed per row
    scale: torch.Tensor  # float16, [out, in // group_size]
    zero: torch.Tensor | None  # float16 [out, in // group_size] for asymmetric, None for symmetric
    symmetric: bool

    def nbytes(self) -> int:
        """Exact bytes of packed codes + scales + zeros as stored (row padding of the codes included)."""
        tensors = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes, ``[out, in]``."""
        return _unpack_codes(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight the codes stand for, in ``dtype`` (default: the original dtype).

        Computed in float32, then cast once to ``dtype``.
        """
        out_f, in_f = self.shape
        groups = in_f // self.group_size
        codes = self.codes().to(torch.float32).reshape(out_f, groups, self.group_size)
        scale = self.scale.to(torch.float32).unsqueeze(-1)
        if self.symmetric:
            w = (codes - float(1 << (self.bits - 1))) * scale
        else:
            assert self.zero is not None
            w = (codes - self.zero.to(torch.float32).unsqueeze(-1)) * scale
        return w.reshape(out_f, in_f).to(dtype or self.dtype)

    def _map(self, fn) -> QuantizedTensor:
        return dataclasses.replace(
            self,
            packed=fn(self.packed),
            scale=fn(self.scale),
            zero=fn(self.zero) if self.zero is not None else None,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        """A copy on ``device`` (``self``'s tensors are reused where they are already there)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> QuantizedTensor:
        """Page-locked CPU copies, for asynchronous host-to-device transfers.

        Pinning needs CUDA; without it (a CPU-only torch, or no GPU) this returns ``self``.
        """
        if not torch.cuda.is_available():
            return self
        if self.device.type != "cpu":
            raise ValueError(f"only CPU tensors can be pinned, this one is on {self.device}")
        return self._map(lambda t: t.pin_memory())

    def is_pinned(self) -> bool:
        """Whether every stored tensor is in page-locked memory."""
        tensors = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        return all(t.is_pinned() for t in tensors)

    @property
    def device(self) -> torch.device:
        return self.packed.device


def quantize(w: torch.Tensor, bits: int, group_size: int = 64, symmetric: bool | None = None,
             scale_grid: str = "float16") -> QuantizedTensor:
    """Round-to-nearest group-wise quantization of a 2-D weight ``[out, in]``.

    ``symmetric`` defaults to True at 8 bits and False (min/max with a zero point) at 4, 3 and 2 bits.
    ``group_size`` must divide ``in_features``. Computation is float32 whatever ``w.dtype``.
    ``scale_grid="bfloat16"`` rounds each scale up to a value bfloat16 also holds exactly (the engine's
    fused kernels take bfloat16 scales); the storage stays float16 and the bound stays ``scale / 2``.
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize expects a floating-point weight, got {w.dtype}")
    out_f, in_f = w.shape
    _check_group_size(group_size, in_f)
    if symmetric is None:
        symmetric = bits == 8
    groups = in_f // group_size
    x = w.detach().to(torch.float32).reshape(out_f, groups, group_size)

    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale16 = _to_fp16_round_up(x.abs().amax(dim=-1) / qmax, scale_grid)
        scale = scale16.float().unsqueeze(-1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax, qmax) + (1 << (bits - 1))
        zero16 = None
    else:
        qmax = (1 << bits) - 1
        lo = x.amin(dim=-1).clamp(max=0.0)
        hi = x.amax(dim=-1).clamp(min=0.0)
        scale16 = _to_fp16_round_up((hi - lo) / qmax, scale_grid)
        scale = scale16.float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero16 = torch.where(scale > 0, -lo / safe, torch.zeros_like(lo)).to(torch.float16)
        zero = zero16.float().unsqueeze(-1)
        q = torch.clamp(torch.round(x / safe.unsqueeze(-1) + zero), 0, qmax)

    packed = _pack_codes(q.reshape(out_f, in_f).to(torch.uint8), bits)
    return QuantizedTensor(
        bits=bits,
        group_size=group_size,
        shape=(out_f, in_f),
        dtype=w.dtype,
        packed=packed,
        scale=scale16.contiguous(),
        zero=zero16.contiguous() if zero16 is not None else None,
        symmetric=symmetric,
    )


def qlinear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``W`` dequantized on the fly into ``x.dtype``; ``x`` is ``[..., in]``."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features, the quantized weight expects {q.shape[1]}")
    return F.linear(x, q.dequantize(x.dtype), bias)


def expected_nbytes(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool) -> int:
    """The storage ``quantize`` would use for a weight of ``shape``, from the formula alone.

    Packed codes (rows padded to a whole packing block) + float16 scales (+ float16 zeros if asymmetric).
    """
    _check_bits(bits)
    out_f, in_f = shape
    _check_group_size(group_size, in_f)
    groups = in_f // group_size
    per_group = 2 if symmetric else 4
    return out_f * _packed_row_bytes(in_f, bits) + out_f * groups * per_group


def quantization_error(w: torch.Tensor, q: QuantizedTensor) -> dict[str, float]:
    """How far ``q`` is from ``w``: max |w - deq|, ||w - deq||_F / ||w||_F, and the round-to-nearest bound.

    ``max_abs_bound`` is the largest per-element error round-to-nearest allows: the largest stored
    float16 scale over all groups, halved.
    """
    if tuple(w.shape) != tuple(q.shape):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match quantized shape {q.shape}")
    ref = w.detach().to(torch.float32)
    diff = ref - q.dequantize(torch.float32).to(ref.device)
    norm = float(torch.linalg.vector_norm(ref))
    err_norm = float(torch.linalg.vector_norm(diff))
    if norm > 0:
        rel_fro = err_norm / norm
    else:
        rel_fro = 0.0 if err_norm == 0 else math.inf
    return {
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_fro": rel_fro,
        "max_abs_bound": float(q.scale.to(torch.float32).max()) / 2 if q.scale.numel() else 0.0,
    }


def fit_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` if it divides ``in_features``, else the largest divisor of ``in_features`` below it
    (e.g. 96 input features with groups of 64 get groups of 48), so every matrix of a model can be
    quantized with at most the requested group size."""
    if group_size <= 0 or in_features <= 0:
        raise ValueError(f"group_size={group_size} and in_features={in_features} must be > 0")
    g = min(group_size, in_features)
    while in_features % g:
        g -= 1
    return g
