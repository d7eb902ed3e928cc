"""Binary (XNOR-Net / BNN) inference: ``BinaryLinear`` computes with xor + popcount on packed sign bits.

For ``x`` in R^n and a binary weight row ``w_c = alpha_c * s_c`` with ``s_c`` in {-1, +1}^n::

    sign(x) . s_c = n - 2 * popcount(bits(x) XOR bits(s_c))

(matching signs add 1, differing signs subtract 1), so a binary Linear is an integer computation on
``ceil(n / 64)`` 64-bit words per row followed by one float multiply by ``alpha_c`` (and the bias add):
``out = alpha_c * (n - 2 * popcount(...)) + bias_c``. The integer part is exact; the float part is the
same two roundings as the float reference ``(sign(x) @ sign(W).T) * alpha + bias`` (whose products are
+-1 and whose sums are exact integers below 2**24), so the two are bit-identical — tested.

**Conventions.** ``sign(v) = +1 for v >= 0 (including -0.0), -1 for v < 0 or NaN`` (BNN's sign with
sign(0) = +1; ``torch.sign`` would give 0, which no bit can encode). Bit 1 = +1. Rows are packed LSB
first into little-endian int64 words (bit ``i`` of a row is bit ``i % 64`` of word ``i // 64``, the
1-bit layout of :func:`lit_compress.quantization.packing.pack_bits`); the padding bits of the last word are
0 in both inputs and weights, so their XOR is 0 and they never count.

**Backends** (``backend=`` on :class:`BinaryLinear` and :func:`xnor_popcount_matmul`):

- ``"torch"``: pure PyTorch. ``bitwise_xor`` of the broadcast words, then a SWAR popcount done in place
  (2-, 4-, 8-bit fields), summed over groups of <= 31 words while the counts still sit in byte lanes, and
  only then folded to one count per row pair; batches are processed in chunks of about 2**18 words so the
  intermediate stays cache-sized. :func:`popcount_swar` / :func:`popcount_lut` are the plain per-word
  popcounts (the lookup table on uint8 views needs an int64 index tensor, 8x the data, and measured 3.7x
  slower than per-word SWAR and 6x slower than the fused path; see ``benchmarks/binary_inference.py``).
- ``"native"``: a 60-line C kernel (``__builtin_popcountll``, 4 input rows per pass over a weight row)
  compiled on first use with the system C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``; ``-O3
  -march=native -ffp-contract=off``, falling back to ``-O3 -ffp-contract=off``) into a temporary folder
  and loaded with ``ctypes``: no torch headers, no Python headers, no ninja, about 0.1 s. One thread. For
  float32 input, scale and bias the whole forward (sign packing, xnor + popcount, ``* alpha + bias`` with
  the same two float roundings as torch, FMA contraction disabled) is one call. Not cached on disk
  (nothing to go stale across machines); ``LIT_COMPRESS_NO_NATIVE=1`` disables it.
- ``"auto"`` (default): native when it builds, otherwise torch (the choice is made once per process).

Measured with ``benchmarks/binary_inference.py`` on the shared 2-core build machine (one thread, under
load, so +-30%): 2048x2048 layer at batch 1: fp32 ``nn.Linear`` 0.85-1.3 ms, ``native`` 0.13-0.14 ms
(0.11-0.15x), ``torch`` 0.8-1.0 ms (0.76-0.98x: parity, not a win); 1024x1024 at batch 1: fp32 0.19-0.28 ms,
native 0.07-0.08 ms, torch 0.48 ms (1.7-2.6x slower). Batch 256, 2048x2048: fp32 47 ms, native 19 ms, torch
200 ms (pure PyTorch loses at large batch: each of its dozen elementwise passes moves as many bytes as the
XOR tensor, ``batch * out * in / 8`` bytes, while fp32 runs one blocked GEMM).

Inference only: no gradient flows through the bits (train with the STE quantizers, then convert).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.quantization.packing import binarize_for_storage, unpack_bits

__all__ = [
    "BinaryLinear",
    "native_available",
    "pack_rows",
    "popcount_lut",
    "popcount_swar",
    "sign_bits",
    "xnor_popcount_matmul",
]

Backend = Literal["auto", "native", "torch"]
_BACKENDS = ("auto", "native", "torch")
WORD_BITS = 64
# SWAR constants (all below 2**63, so they are plain int64 scalars).
_M1, _M2, _M4, _M8 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x00FF00FF00FF00FF
_GROUP = 31  # words whose byte-lane counts (<= 8 each) can be summed before a byte overflows (31*8=248)
_CHUNK_WORDS = 1 << 18
_BYTE_SHIFTS = torch.arange(8, dtype=torch.uint8)
_LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def sign_bits(x: Tensor) -> Tensor:
    """``x >= 0`` as bool: the bit of BNN's sign (+1 for ``x >= 0``, -1 otherwise, NaN included)."""
    return x >= 0


def _words(n: int) -> int:
    return -(-n // WORD_BITS)


def pack_rows(bits: Tensor, words: int | None = None) -> Tensor:
    """Pack each row of a 2-D bool tensor ``[rows, n]`` into int64 words ``[rows, words]``, LSB first.

    ``words`` (default ``ceil(n / 64)``) may be larger: the extra words are zero, like the padding bits.
    """
    if not isinstance(bits, Tensor) or bits.dim() != 2:
        got = list(bits.shape) if isinstance(bits, Tensor) else type(bits).__name__
        raise ValueError(f"pack_rows expects a 2-D bool tensor [rows, n], got {got}")
    rows, n = bits.shape
    words = _words(n) if words is None else words
    if words < _words(n):
        raise ValueError(f"{n} bits need {_words(n)} words per row, got words={words}")
    b = bits.to(torch.uint8)
    b = F.pad(b, (0, words * WORD_BITS - n))
    packed = (b.view(rows, words * 8, 8) << _BYTE_SHIFTS).sum(dim=-1, dtype=torch.uint8)
    return packed.view(torch.int64)


def popcount_swar(words: Tensor) -> Tensor:
    """Per-word popcount of an int64 tensor (SWAR bit trick, no overflow: every intermediate is >= 0)."""
    v = (words & _M1) + ((words >> 1) & _M1)
    v = (v & _M2) + ((v >> 2) & _M2)
    v = (v + (v >> 4)) & _M4
    v = (v & _M8) + ((v >> 8) & _M8)
    v = v + (v >> 16)
    return (v + (v >> 32)) & 0x7F


def popcount_lut(words: Tensor) -> Tensor:
    """Per-word popcount of an int64 tensor via a 256-entry table on its uint8 view."""
    counts = _LUT[words.contiguous().view(torch.uint8).long()]
    return counts.view(*words.shape, 8).sum(dim=-1)


def _gemm_torch(x_words: Tensor, w_words: Tensor, n: int) -> Tensor:
    """``n - 2 * popcount(x XOR w)`` summed over words, for every (input row, weight row): int64 [B, O]."""
    batch, words = x_words.shape
    out_features = w_words.shape[0]
    groups = -(-words // _GROUP)
    group = -(-words // groups)
    pad = groups * group - words
    if pad:  # zero words on both sides: XOR 0, count 0
        x_words, w_words = F.pad(x_words, (0, pad)), F.pad(w_words, (0, pad))
    out = torch.empty(batch, out_features, dtype=torch.int64)
    rows = max(1, _CHUNK_WORDS // max(1, out_features * (words + pad)))
    for start in range(0, batch, rows):
        xs = x_words[start : start + rows]
        v = torch.bitwise_xor(xs[:, None, :], w_words[None])
        t = torch.empty_like(v)
        torch.bitwise_right_shift(v, 1, out=t)
        t &= _M1
        v &= _M1
        v += t  # 2-bit fields
        torch.bitwise_right_shift(v, 2, out=t)
        t &= _M2
        v &= _M2
        v += t  # 4-bit fields
        torch.bitwise_right_shift(v, 4, out=t)
        v += t
        v &= _M4  # byte lanes, each <= 8
        acc = v.view(xs.shape[0], out_features, groups, group).sum(dim=-1)  # byte lanes <= 8 * 31
        acc = (acc & _M8) + ((acc >> 8) & _M8)  # 16-bit lanes
        acc = acc + (acc >> 32)
        acc = (acc + (acc >> 16)) & 0xFFFF
        out[start : start + rows] = n - 2 * acc.sum(dim=-1)
    return out


_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* bits of x >= 0 (NaN -> 0), LSB first, `words` int64 words per row; padding bits 0 */
void lc_pack_signs_f32(const float* x, int64_t rows, int64_t n, int64_t words, uint64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    uint64_t* o = out + r * words;
    memset(o, 0, (size_t)words * sizeof(uint64_t));
    for (int64_t i = 0; i < n; ++i) o[i >> 6] |= (uint64_t)(xr[i] >= 0.0f) << (i & 63);
  }
}

/* d = n - 2 * popcount(x[b] ^ w[o]) over W words, stored as int64 (iout) or as the float32
   (float)d * scale[o] (+ bias[o]): two IEEE roundings, like torch's mul then add (built with
   -ffp-contract=off so the compiler does not fuse them into one FMA) */
static void store(int64_t d, int64_t i, int64_t o, int64_t* iout, float* fout, const float* scale,
                  const float* bias) {
  if (iout) {
    iout[i] = d;
  } else {
    float r = (float)d * scale[o];
    if (bias) r = r + bias[o];
    fout[i] = r;
  }
}

static void gemm(const uint64_t* x, const uint64_t* w, int64_t B, int64_t O, int64_t W, int64_t n,
                 int64_t* iout, float* fout, const float* scale, const float* bias) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) { /* 4 input rows per pass over a weight row */
    const uint64_t *x0 = x + b * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;
    for (int64_t o = 0; o < O; ++o) {
      const uint64_t* wr = w + o * W;
      int64_t p0 = 0, p1 = 0, p2 = 0, p3 = 0;
      for (int64_t k = 0; k < W; ++k) {
        uint64_t wk = wr[k];
        p0 += __builtin_popcountll(x0[k] ^ wk);
        p1 += __builtin_popcountll(x1[k] ^ wk);
        p2 += __builtin_popcountll(x2[k] ^ wk);
        p3 += __builtin_popcountll(x3[k] ^ wk);
      }
      store(n - 2 * p0, b * O + o, o, iout, fout, scale, bias);
      store(n - 2 * p1, (b + 1) * O + o, o, iout, fout, scale, bias);
      store(n - 2 * p2, (b + 2) * O + o, o, iout, fout, scale, bias);
      store(n - 2 * p3, (b + 3) * O + o, o, iout, fout, scale, bias);
    }
  }
  for (; b < B; ++b) {
    const uint64_t* xr = x + b * W;
    for (int64_t o = 0; o < O; ++o) {
      const uint64_t* wr = w + o * W;
      int64_t p = 0;
      for (int64_t k = 0; k < W; ++k) p += __builtin_popcountll(xr[k] ^ wr[k]);
      store(n - 2 * p, b * O + o, o, iout, fout, scale, bias);
    }
  }
}

void lc_xnor_gemm(const uint64_t* x, const uint64_t* w, int64_t B, int64_t O, int64_t W, int64_t n,
                  int64_t* out) {
  gemm(x, w, B, O, W, n, out, 0, 0, 0);
}

/* the whole BinaryLinear forward for float32: pack x's signs into xbits [B, W], then the product */
void lc_binary_linear_f32(const float* x, int64_t B, int64_t n, int64_t W, const uint64_t* w, int64_t O,
                          const float* scale, const float* bias, uint64_t* xbits, float* out) {
  lc_pack_signs_f32(x, B, n, W, xbits);
  gemm(xbits, w, B, O, W, n, 0, out, scale, bias);
}
"""

_native_lock = threading.Lock()
_native_lib: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _compile_native() -> ctypes.CDLL | None:
    if os.environ.get("LIT_COMPRESS_NO_NATIVE"):
        return None
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not compiler:
        return None
    with tempfile.TemporaryDirectory(prefix="lit_compress_binary_", ignore_cleanup_errors=True) as tmp:
        src, lib = Path(tmp) / "xnor.c", Path(tmp) / "xnor.so"
        src.write_text(_C_SOURCE)
        for flags in (["-O3", "-march=native", "-ffp-contract=off"], ["-O3", "-ffp-contract=off"]):
            try:
                done = subprocess.run(
                    [compiler, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                return None
            if done.returncode == 0:
                break
        else:
            return None
        try:
            handle = ctypes.CDLL(str(lib))  # stays mapped after the folder is removed
        except OSError:
            return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    handle.lc_xnor_gemm.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr]
    handle.lc_xnor_gemm.restype = None
    handle.lc_binary_linear_f32.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr]
    handle.lc_binary_linear_f32.restype = None
    return handle


def _native() -> ctypes.CDLL | None:
    global _native_lib
    if _native_lib is None:
        with _native_lock:
            if _native_lib is None:
                _native_lib = _compile_native() or False
    return _native_lib or None


def native_available() -> bool:
    """Whether the C kernel built on this machine (compiles it on the first call)."""
    return _native() is not None


def _resolve(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if _native() is not None:
        return "native"
    if backend == "native":
        raise RuntimeError(
            "backend='native' needs a C compiler (cc, gcc or clang on PATH, or $CC) and it did not build "
            "here (or LIT_COMPRESS_NO_NATIVE is set); use backend='torch' or 'auto'"
        )
    return "torch"


def xnor_popcount_matmul(x_words: Tensor, w_words: Tensor, n: int, backend: Backend = "auto") -> Tensor:
    """The integer product ``sign(x) @ sign(W).T`` from packed rows: int64 ``[B, O]``.

    ``x_words`` ``[B, words]`` and ``w_words`` ``[O, words]`` are int64 rows from :func:`pack_rows`, ``n``
    the number of real bits per row (the padding bits beyond ``n`` must be 0 in both).
    """
    for name, t in (("x_words", x_words), ("w_words", w_words)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 2 or t.device.type != "cpu":
            raise TypeError(f"{name} must be a 2-D int64 CPU tensor from pack_rows, got {t!r}")
    if x_words.shape[1] != w_words.shape[1] or not 0 <= n <= WORD_BITS * x_words.shape[1]:
        raise ValueError(
            f"x_words {list(x_words.shape)} and w_words {list(w_words.shape)} must have the same number of "
            f"words, enough for n={n} bits"
        )
    if _resolve(backend) == "torch":
        return _gemm_torch(x_words, w_words, n)
    x_words, w_words = x_words.contiguous(), w_words.contiguous()
    out = torch.empty(x_words.shape[0], w_words.shape[0], dtype=torch.int64)
    (batch, words), out_features = x_words.shape, w_words.shape[0]
    _native().lc_xnor_gemm(
        x_words.data_ptr(), w_words.data_ptr(), batch, out_features, words, n, out.data_ptr()
    )
    return out


def _fused_ok(x2d: Tensor, scale: Tensor, bias: Tensor | None) -> bool:
    """The C kernel's one-call forward handles float32 input, scale and bias."""
    f32 = torch.float32
    return x2d.dtype == f32 and scale.dtype == f32 and (bias is None or bias.dtype == f32)


class BinaryLinear(nn.Module):
    """``y = alpha * (sign(x) @ sign(W).T) + bias`` with W stored as bits (1 bit per weight).

    Buffers: ``weight_words`` (int64 ``[out, ceil(in / 64)]``, :func:`pack_rows` layout), ``scale`` (the
    per-output-channel ``alpha``, float ``[out]``) and ``bias`` (or None). Build it with
    :meth:`from_linear` (a trained binary-weight ``nn.Linear``) or :meth:`from_packed` (the zoo's bit-packed
    storage). Input ``[..., in]`` of any float dtype; output ``[..., out]`` in ``scale``'s dtype.
    Not an ``nn.Linear`` subclass on purpose: it holds no float weight (that would undo the 32x saving).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_features >= 1 << 24:
            raise ValueError(
                f"in_features={in_features} is too large: the float32 result is exact only below 2**24"
            )
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        words = torch.zeros(out_features, _words(in_features), dtype=torch.int64)
        self.register_buffer("weight_words", words)
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scales: Tensor | float | None = None, backend: Backend = "auto"
    ) -> BinaryLinear:
        """Convert a binary-weight ``nn.Linear``.

        ``scales=None``: the weight must be binary per output channel (every entry of row ``c`` is
        ``+alpha_c`` or ``-alpha_c``; ValueError otherwise) and ``alpha`` is read from it, so the result
        computes exactly what the Linear computes on ``sign(x)`` up to float summation order. With
        ``scales`` (a float, or one per output channel, e.g. XNOR-Net's ``mean |W_c|``): the weight is
        replaced by ``sign(W) * scales`` (latent real-valued weights binarised here).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach().cpu()
        if scales is None:
            _, alpha = binarize_for_storage(weight, name="linear.weight")
        else:
            alpha = torch.as_tensor(scales, dtype=weight.dtype).detach().cpu()
            if alpha.dim() == 0:
                alpha = alpha.expand(linear.out_features)
            if alpha.shape != (linear.out_features,) or not torch.isfinite(alpha).all():
                raise ValueError(
                    f"scales must be a finite float or {linear.out_features} finite floats (one per output "
                    f"channel), got shape {list(alpha.shape)}"
                )
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, backend=backend)
        module.weight_words.copy_(pack_rows(sign_bits(weight)))
        module.scale = alpha.clone().contiguous()
        if linear.bias is not None:
            module.bias = linear.bias.detach().cpu().clone()
        return module

    @classmethod
    def from_packed(
        cls,
        signs: Tensor,
        scales: Tensor,
        in_features: int,
        bias: Tensor | None = None,
        backend: Backend = "auto",
    ) -> BinaryLinear:
        """Build from :func:`~lit_compress.quantization.packing.binarize_for_storage` output (one flat
        1-bit stream for the whole ``[out, in]`` weight, 1 = positive) and its per-channel ``scales``."""
        if not isinstance(scales, Tensor) or scales.dim() != 1 or not scales.is_floating_point():
            raise TypeError(f"scales must be a 1-D float tensor (one per output channel), got {scales!r}")
        out_features = scales.numel()
        module = cls(in_features, out_features, bias=bias is not None, backend=backend)
        bits = unpack_bits(signs, 1, out_features * in_features).view(out_features, in_features).bool()
        module.weight_words.copy_(pack_rows(bits))
        module.scale = scales.detach().cpu().clone().contiguous()
        if bias is not None:
            module.bias = bias.detach().cpu().clone()
        return module

    def weight_signs(self) -> Tensor:
        """The +-1 weight matrix ``[out, in]`` (float32), unpacked from the bits."""
        words = self.weight_words.contiguous().view(torch.uint8)
        bits = (words.view(self.out_features, -1, 1) >> _BYTE_SHIFTS) & 1
        bits = bits.view(self.out_features, -1)[:, : self.in_features]
        return bits.float() * 2 - 1

    def dequantized_weight(self) -> Tensor:
        """``sign(W) * alpha``: the float weight this module stands for."""
        return self.weight_signs().to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {list(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"BinaryLinear runs on the CPU; got an input on {x.device}")
        backend = _resolve(self.backend)
        x2d = x.detach().reshape(-1, self.in_features)
        words, scale, bias = self.weight_words, self.scale, self.bias
        if backend == "native" and _fused_ok(x2d, scale, bias):
            x2d, words = x2d.contiguous(), words.contiguous()
            out = torch.empty(x2d.shape[0], self.out_features, dtype=torch.float32)
            scratch = torch.empty(x2d.shape[0], words.shape[1], dtype=torch.int64)
            _native().lc_binary_linear_f32(
                x2d.data_ptr(),
                x2d.shape[0],
                self.in_features,
                words.shape[1],
                words.data_ptr(),
                self.out_features,
                scale.contiguous().data_ptr(),
                None if bias is None else bias.contiguous().data_ptr(),
                scratch.data_ptr(),
                out.data_ptr(),
            )
        else:
            x_words = pack_rows(sign_bits(x2d), words.shape[1])
            dots = xnor_popcount_matmul(x_words, words, self.in_features, backend=backend)
            out = dots.to(scale.dtype) * scale
            if bias is not None:
                out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )
