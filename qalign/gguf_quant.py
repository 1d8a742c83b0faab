"""Which GGML type each tensor gets, and the numpy quantizers the `gguf` package lacks (Q4_K, Q6_K).

The choice follows llama.cpp's own quantize tool so a file from here behaves like one from llama-quantize:
1-d tensors (norms, biases) stay F32; q4_k_m is Q4_K with Q6_K for the output projection and for attn_v /
ffn_down in the layers where llama.cpp spends more bits; a row length K-quants cannot take (not a multiple of
256) falls back to the legacy type of similar size, and one Q8_0/Q5_0 cannot take either to F16.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gq

T = GGMLQuantizationType
QK_K = 256

QUANTS: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
# llama.cpp's substitutes when a row is not a whole number of 256-value super-blocks.
_K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def _more_bits(layer: int, n_layers: int) -> bool:
    # The first and last eighth of the layers and every third one between: where llama.cpp's Q4_K_M gives
    # attn_v and ffn_down Q6_K, because errors there cost the most perplexity.
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, has_output: bool) -> T:
    """The GGML type of tensor ``name`` (GGUF naming) of numpy ``shape`` in a ``quant`` export."""
    if len(shape) == 1 or name == "rope_freqs.weight":
        return T.F32
    wanted = QUANTS[quant][0]
    if wanted == T.Q4_K:
        is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        # A fused QKV (Phi-3) counts as the V projection, as in llama.cpp.
        more_bits = name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight"))
        if is_output or (more_bits and _more_bits(layer, n_layers)):
            wanted = T.Q6_K
        if shape[-1] % QK_K:
            wanted = _K_FALLBACK[wanted]
    if wanted not in (T.F32, T.F16, T.BF16) and shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return T.F16
    return wanted


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def quantize(data: np.ndarray, qtype: T) -> np.ndarray:
    """``data`` (float32, rows last) in ``qtype``: a float array for F32/F16, raw bytes otherwise."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in (T.Q4_K, T.Q6_K):
        blocks = data.reshape(-1, QK_K)
        out = np.concatenate(
            [
                (_q4_k if qtype == T.Q4_K else _q6_k)(chunk)
                for chunk in np.array_split(blocks, max(1, len(blocks) // 1024))
            ]
        )
        return out.reshape(*data.shape[:-1], -1)
    return gq.quantize(data, qtype)


def dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    return gq.dequantize(raw, qtype)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _fit_scale_min(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x``: (scale, offset) minimising sum(w * (x - (scale * q - offset))^2) with q integer in
    [0, nmax], by trying a grid of scales around max-min/nmax and refitting each by weighted least squares
    (the search llama.cpp's make_qkx2_quants does, over all rows at once)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    span = np.where(hi > lo, hi - lo, 1.0)
    steps = np.arange(21, dtype=np.float32) * 0.1 - 1.0  # rmin -1, rdelta 0.1, 20 steps
    inv = (nmax + steps[None, :]) / span[:, None]  # (rows, candidates)
    q = np.clip(np.rint(inv[..., None] * (x[:, None, :] - lo[:, None, None])), 0, nmax)
    w = weights[:, None, :]
    xs = x[:, None, :]
    sw, swq, swq2 = w.sum(-1), (w * q).sum(-1), (w * q * q).sum(-1)
    swx, swqx = (w * xs).sum(-1), (w * q * xs).sum(-1)
    det = sw * swq2 - swq * swq
    ok = det > 0
    safe = np.where(ok, det, 1.0)
    scale = np.where(ok, (sw * swqx - swq * swx) / safe, 0.0)
    low = np.where(ok, (swq2 * swx - swq * swqx) / safe, lo[:, None])
    # A positive low end would need a negative offset, which the format cannot store: refit with low = 0.
    clipped = low > 0
    scale = np.where(clipped, np.where(swq2 > 0, swqx / np.where(swq2 > 0, swq2, 1.0), 0.0), scale)
    low = np.where(clipped, 0.0, low)
    err = (w * (scale[..., None] * q + low[..., None] - xs) ** 2).sum(-1)
    # The plain min/max fit is a candidate too, so the search is never worse than it.
    base_scale = span / nmax
    base_q = np.clip(np.rint((x - lo[:, None]) / base_scale[:, None]), 0, nmax)
    base_err = (weights * (base_scale[:, None] * base_q + lo[:, None] - x) ** 2).sum(-1)
    best = err.argmin(-1)
    rows = np.arange(len(x))
    use_base = base_err <= err[rows, best]
    scale = np.where(use_base, base_scale, scale[rows, best])
    low = np.where(use_base, lo, low[rows, best])
    scale = np.where(hi > lo, np.maximum(scale, 0.0), 0.0)
    return scale.astype(np.float32), (-low).astype(np.float32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sub = blocks.reshape(n * 8, 32)
    # llama.cpp weights each value by the block's RMS plus its own magnitude: big values matter more.
    weights = np.sqrt((sub * sub).mean(-1, keepdims=True)) + np.abs(sub)
    scale, offset = _fit_scale_min(sub, weights, 15)
    scale, offset = scale.reshape(n, 8), offset.reshape(n, 8)
    max_scale, max_offset = scale.max(-1), offset.max(-1)
    d = np.where(max_scale > 0, max_scale / 63, 0.0).astype(np.float16).astype(np.float32)
    dmin = np.where(max_offset > 0, max_offset / 63, 0.0).astype(np.float16).astype(np.float32)
    ls = np.clip(np.rint(scale / np.where(d > 0, d, 1.0)[:, None]), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(offset / np.where(dmin > 0, dmin, 1.0)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * ls).reshape(n * 8, 1)
    shift = (dmin[:, None] * lm).reshape(n * 8, 1)
    q = np.clip(np.rint((sub + shift) / np.where(step > 0, step, 1.0)), 0, 15).astype(np.uint8)
    q = np.where(step > 0, q, 0).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=-1)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row: the scale s minimising sum(x^2 * (x - s*q)^2), q integer in [-nmax, nmax-1], searched around
    the largest-magnitude value (llama.cpp's make_qx_quants with x^2 weights)."""
    rows = np.arange(len(x))
    peak = x[rows, np.abs(x).argmax(-1)]
    safe_peak = np.where(peak != 0, peak, 1.0)
    steps = np.arange(-9, 10, dtype=np.float32) * 0.1
    inv = -(nmax + steps[None, :]) / safe_peak[:, None]
    q = np.clip(np.rint(inv[..., None] * x[:, None, :]), -nmax, nmax - 1)
    w = (x * x)[:, None, :]
    swqx = (w * q * x[:, None, :]).sum(-1)
    swq2 = (w * q * q).sum(-1)
    gain = np.where(swq2 > 0, swqx * swqx / np.where(swq2 > 0, swq2, 1.0), -1.0)
    best = gain.argmax(-1)
    scale = np.where(swq2[rows, best] > 0, swqx[rows, best] / np.where(swq2 > 0, swq2, 1.0)[rows, best], 0.0)
    return np.where(peak != 0, scale, 0.0).astype(np.float32)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sub = blocks.reshape(n * 16, 16)
    scale = _fit_symmetric(sub, 32).reshape(n, 16)
    rows = np.arange(n)
    peak = scale[rows, np.abs(scale).argmax(-1)]
    d = np.where(peak != 0, peak / -128, 0.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d != 0, d, 1.0)[:, None]), -128, 127).astype(np.int8)
    step = (d[:, None] * sc).reshape(n * 16, 1)
    q = np.clip(np.rint(sub / np.where(step != 0, step, 1.0)), -32, 31) + 32
    q = np.where(step != 0, q, 32).astype(np.uint8).reshape(n, 2, 4, 32)
    # Each 128-value half: its 4 quarters' low nibbles pair up (0 with 2, 1 with 3) in ql, their top 2 bits
    # share one qh byte.
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=-1)
