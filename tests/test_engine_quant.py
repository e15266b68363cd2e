"""Group-wise weight-only quantization (moecap.engine.quant): error bounds, packing, storage, qlinear."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from moecap.engine.quant import (
    QuantizedTensor,
    _pack_codes,
    _unpack_codes,
    expected_nbytes,
    qlinear,
    quantization_error,
    quantize,
)

BITS = (8, 4, 3, 2)
OUT, IN, GROUP = 256, 512, 64

# rel_fro ceilings on the seeded gaussian [256, 512] weight, group 64. Measured (float32; bfloat16 is
# within 2e-4 of these):
#   symmetric:  8 bits 0.00594, 4 bits 0.1077, 3 bits 0.2511, 2 bits 0.7184
#   asymmetric: 8 bits 0.00529, 4 bits 0.0895, 3 bits 0.1924, 2 bits 0.4500
# (max_abs reached 95-99.9 % of max_abs_bound at every width.)
CEILING = {
    True: {8: 0.0075, 4: 0.12, 3: 0.28, 2: 0.80},
    False: {8: 0.0065, 4: 0.10, 3: 0.22, 2: 0.50},
}


def gaussian(dtype: torch.dtype = torch.float32, shape: tuple[int, int] = (OUT, IN), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def storage_bytes(q: QuantizedTensor) -> int:
    tensors = [q.packed, q.scale] + ([q.zero] if q.zero is not None else [])
    assert all(t.is_contiguous() for t in tensors)
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_within_bound_and_shrinking_with_bits(dtype, symmetric):
    w = gaussian(dtype)
    rel = {}
    for bits in BITS:
        q = quantize(w, bits, GROUP, symmetric=symmetric)
        assert q.symmetric is symmetric and (q.zero is None) is symmetric
        assert q.scale.dtype == torch.float16 and q.scale.shape == (OUT, IN // GROUP)
        err = quantization_error(w, q)
        tol = 1e-6 * float(w.float().abs().max())
        assert err["max_abs"] <= err["max_abs_bound"] + tol, (bits, err)
        # the bound is the stored scale / 2, not something loose
        assert err["max_abs"] > 0.9 * err["max_abs_bound"], (bits, err)
        assert err["rel_fro"] < CEILING[symmetric][bits], (bits, err)
        rel[bits] = err["rel_fro"]
        deq = q.dequantize()
        assert deq.dtype == dtype and deq.shape == (OUT, IN)
    assert rel[2] > rel[3] > rel[4] > rel[8], rel


def test_default_symmetry_and_bound_formula():
    w = gaussian()
    assert quantize(w, 8).symmetric and quantize(w, 8).zero is None
    for bits in (4, 3, 2):
        q = quantize(w, bits)
        assert not q.symmetric and q.zero is not None and q.zero.dtype == torch.float16
    # the bound follows the documented formulas, up to float16 rounding of the scale (rounded up)
    groups = w.reshape(OUT, IN // GROUP, GROUP)
    absmax = groups.abs().amax(-1)
    sym_bound = quantization_error(w, quantize(w, 4, symmetric=True))["max_abs_bound"]
    assert sym_bound == pytest.approx(float((absmax / 7 / 2).max()), rel=1e-3)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    asym_bound = quantization_error(w, quantize(w, 4, symmetric=False))["max_abs_bound"]
    assert asym_bound == pytest.approx(float(((hi - lo) / 15 / 2).max()), rel=1e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_bound_holds_with_coarse_float16_scales(symmetric):
    """Tiny weights put the scales among float16 subnormals (few significant bits): the stored scale is
    rounded up, never down, so the grid still covers every group and the bound still holds."""
    w = gaussian() * 1e-6
    for bits in BITS:
        q = quantize(w, bits, GROUP, symmetric=symmetric)
        err = quantization_error(w, q)
        assert err["max_abs"] <= err["max_abs_bound"] * (1 + 1e-5), (bits, err)
        assert 0 < err["rel_fro"] < 1, (bits, err)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 24, 513])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = _pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    per_block, bytes_per_block = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}[bits]
    assert packed.shape == (5, -(-n // per_block) * bytes_per_block)
    back = _unpack_codes(packed, bits, n)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


def test_pack_layout():
    # 4 bits: first code in the low nibble
    assert _pack_codes(torch.tensor([[0x1, 0xA]], dtype=torch.uint8), 4).tolist() == [[0xA1]]
    # 2 bits: first code in the lowest two bits
    assert _pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # 3 bits: eight codes as the 24-bit integer sum(c_k << 3k), low byte first
    codes = list(range(8))
    value = sum(c << (3 * k) for k, c in enumerate(codes))
    expected = [value & 0xFF, (value >> 8) & 0xFF, value >> 16]
    assert _pack_codes(torch.tensor([codes], dtype=torch.uint8), 3).tolist() == [expected]
    # 8 bits: the codes themselves
    assert _pack_codes(torch.tensor([[0, 200, 255]], dtype=torch.uint8), 8).tolist() == [[0, 200, 255]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_nbytes_is_real_storage(bits, symmetric):
    q = quantize(gaussian(), bits, GROUP, symmetric=symmetric)
    assert q.nbytes() == storage_bytes(q) == expected_nbytes((OUT, IN), bits, GROUP, symmetric)
    groups = OUT * (IN // GROUP)
    assert q.nbytes() == OUT * IN * bits // 8 + groups * 2 * (1 if symmetric else 2)


def test_nbytes_examples():
    q = quantize(gaussian(), 4, 64, symmetric=False)
    assert q.nbytes() == 256 * 512 // 2 + 2 * 256 * 8 * 2 == 73728
    assert expected_nbytes((256, 512), 8, 128, True) == 256 * 512 + 256 * 4 * 2
    # 3 bits with in_features 12 (group 4): each row is padded to 16 codes = 6 bytes, and that counts
    w = gaussian(shape=(3, 12))
    q3 = quantize(w, 3, 4)
    assert q3.packed.shape == (3, 6)
    assert q3.nbytes() == storage_bytes(q3) == expected_nbytes((3, 12), 3, 4, False) == 3 * 6 + 3 * 3 * 4
    assert quantization_error(w, q3)["max_abs"] <= quantization_error(w, q3)["max_abs_bound"] + 1e-6
    # odd in_features at 4 bits: padded to a whole byte per row
    q4 = quantize(gaussian(shape=(2, 5)), 4, 5)
    assert q4.packed.shape == (2, 3) and q4.nbytes() == expected_nbytes((2, 5), 4, 5, False) == 2 * 3 + 2 * 4


def test_qlinear():
    w = gaussian()
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(OUT, generator=torch.Generator().manual_seed(2))
    exact = F.linear(x, w, bias)
    rel = {}
    for bits in BITS:
        q = quantize(w, bits, GROUP)
        y = qlinear(x, q, bias)
        assert y.shape == (2, 3, OUT) and y.dtype == x.dtype
        assert torch.equal(y, F.linear(x, q.dequantize(), bias))
        rel[bits] = float(torch.linalg.vector_norm(y - exact) / torch.linalg.vector_norm(exact))
    assert rel[2] > rel[3] > rel[4] > rel[8], rel
    assert rel[8] < 0.01 and rel[4] < 0.12, rel
    # dequantized on the fly into x's dtype
    q = quantize(w, 4, GROUP)
    xb = x.to(torch.bfloat16)
    yb = qlinear(xb, q)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, F.linear(xb, q.dequantize(torch.bfloat16)))
    with pytest.raises(ValueError, match="511"):
        qlinear(torch.zeros(4, IN - 1), q)


def test_to_and_pin_memory_on_cpu():
    q = quantize(gaussian(), 4, GROUP)
    moved = q.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize())
    pinned = q.pin_memory()
    assert isinstance(pinned, QuantizedTensor)
    assert torch.equal(pinned.dequantize(), q.dequantize())
    if not torch.cuda.is_available():
        assert pinned is q


def test_invalid_arguments():
    w = gaussian()
    with pytest.raises(ValueError, match=r"100.*512|512.*100"):
        quantize(w, 4, 100)
    with pytest.raises(ValueError, match=r"bits=5.*2, 3, 4, 8"):
        quantize(w, 5)
    with pytest.raises(ValueError, match=re.escape("group_size=0")):
        quantize(w, 4, 0)
    with pytest.raises(ValueError, match=re.escape("group_size=-64")):
        quantize(w, 4, -64)
    with pytest.raises(ValueError, match=r"100.*512|512.*100"):
        expected_nbytes((256, 512), 4, 100, False)
    with pytest.raises(ValueError, match=r"bits=5.*2, 3, 4, 8"):
        expected_nbytes((256, 512), 5, 64, False)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(2, 4, 64), 4)
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((2, 64), float("nan")), 4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_weight(bits, symmetric):
    w = torch.zeros(8, 128)
    q = quantize(w, bits, 64, symmetric=symmetric)
    deq = q.dequantize()
    assert not torch.isnan(deq).any()
    assert torch.equal(deq, w)
    err = quantization_error(w, q)
    assert err == {"max_abs": 0.0, "rel_fro": 0.0, "max_abs_bound": 0.0}
    # the codes are the grid's zero (offset-binary middle, or the zero point 0), not garbage from 0/0
    zero_code = 2 ** (bits - 1) if symmetric else 0
    assert torch.equal(q.codes(), torch.full((8, 128), zero_code, dtype=torch.uint8))
    # one all-zero group among ordinary ones: the others are unaffected, the zero group stays exact
    w2 = gaussian(shape=(8, 128))
    w2[3, 64:] = 0
    q2 = quantize(w2, bits, 64, symmetric=symmetric)
    deq2 = q2.dequantize()
    assert torch.equal(deq2[3, 64:], torch.zeros(64))
    e2 = quantization_error(w2, q2)
    assert e2["max_abs"] <= e2["max_abs_bound"] + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu(bits):
    w = gaussian()
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1))
    q = quantize(w, bits, GROUP)
    qc = q.pin_memory().to("cuda", non_blocking=True)
    assert qc.device.type == "cuda"
    assert torch.equal(qc.dequantize().cpu(), q.dequantize())
    y_cpu = qlinear(x, q)
    y_gpu = qlinear(x.cuda(), qc)
    assert y_gpu.device.type == "cuda"
    assert torch.equal(y_gpu, F.linear(x.cuda(), q.dequantize().cuda()))
    # loose enough for a different summation order (or TF32, if a user switched it on)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-3, atol=2e-2)
    # quantizing on the GPU stays within the bound and unpacks like the CPU codes
    qg = quantize(w.cuda(), bits, GROUP)
    err = quantization_error(w.cuda(), qg)
    assert err["max_abs"] <= err["max_abs_bound"] + 1e-5
    mismatch = (qg.codes().cpu() != q.codes()).float().mean().item()
    assert mismatch < 1e-3, mismatch
    assert torch.equal(_unpack_codes(qg.packed, bits, IN).cpu(), qg.codes().cpu())


def test_fit_group_size():
    from moecap.engine.quant import fit_group_size

    assert fit_group_size(14336, 64) == 64
    assert fit_group_size(96, 64) == 48
    assert fit_group_size(7, 64) == 7 and fit_group_size(97, 64) == 1
    with pytest.raises(ValueError, match="group_size=0"):
        fit_group_size(96, 0)
