"""Flash-decoding for MEA over a cache of h' component heads, with the head mixing absorbed.

One program takes one batch row, one slice of the cached sequence and ALL query rows of that row
(the h heads times the Lq new tokens), so every cached key/value byte is read from memory once per
row: the traffic of GQA with h' KV heads, whatever h' is. For each block of keys it loops over the
h' component heads:

    logits[r, n] = scale * sum_j W^K[j, head(r)] (q_r . k_j[n])       (key mixing = logit mixing)
    acc[r, :]   += sum_j (p[r, n] W^V[j, head(r)]) v_j[n]             (value mixing on the output)

so neither the h composite heads nor the (h x h'd) absorbed query is ever built; the accumulator
stays (rows x d). Slices are merged by a second kernel through their log-sum-exp (flash-decoding).
Query t of a row with ``cache_seqlens[b] = L`` sees keys ``[0, L - Lq + t]`` (queries aligned to
the end of the row, as in ``flash_attn_with_kvcache``).

The kernels run on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_util import KERNEL_DTYPES as _DTYPES
from .triton_util import cdiv, next_pow2, sm_count

__all__ = ["mea_decode_triton", "decode_launch_config", "to_paged"]

_LOG2E = 1.4426950408889634
# The merge holds every slice of a row in registers at once.
MAX_SPLITS = 256


@triton.jit
def _kv_offsets(offs_n, n_ok, bt_row, stride_kp, stride_kn, stride_vp, stride_vn,
                PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Memory offsets of keys and values ``offs_n`` of one row: contiguous, or through the row's block
    table (key n lives in page ``bt_row[n // PAGE]`` at slot ``n % PAGE``; one table read for both)."""
    if PAGED:
        page = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kn = page * stride_kp + slot * stride_kn
        vn = page * stride_vp + slot * stride_vn
    else:
        kn = offs_n * stride_kn
        vn = offs_n * stride_vn
    return kn, vn


@triton.jit
def _attend_rows_major(q, k_base, v_base, WK, WV, head, row_ok, first, row_len, start, end, HK, qk_scale,
                       stride_kp, stride_kh, stride_kn, stride_kd, stride_vp, stride_vh, stride_vn, stride_vd,
                       stride_wkj, stride_wki, stride_wvj, stride_wvi, bt_row,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Online softmax over keys [start, end) with query rows as the MMA's M dimension."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kn, vn = _kv_offsets(offs_n, n_ok, bt_row, stride_kp, stride_kn, stride_vp, stride_vn, PAGED, PAGE)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j in range(HK):
            k = tl.load(k_base + j * stride_kh + kn[None, :] + offs_d[:, None] * stride_kd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            wk = tl.load(WK + j * stride_wkj + head * stride_wki, mask=row_ok, other=0.0).to(tl.float32)
            s += tl.dot(q, k, input_precision=DOT_PRECISION) * (wk * qk_scale)[:, None]
        s = tl.where((offs_n[None, :] >= first) & (offs_n[None, :] < row_len[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that sees no key of this block yet keeps m = -inf; shift by 0 so no NaN appears.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        for j in range(HK):
            v = tl.load(v_base + j * stride_vh + vn[:, None] + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            wv = tl.load(WV + j * stride_wvj + head * stride_wvi, mask=row_ok, other=0.0).to(tl.float32)
            acc = tl.dot((p * wv[:, None]).to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_keys_major(q, k_base, v_base, WK, WV, head, row_ok, first, row_len, start, end, HK, qk_scale,
                       stride_kp, stride_kh, stride_kn, stride_kd, stride_vp, stride_vh, stride_vn, stride_vd,
                       stride_wkj, stride_wki, stride_wvj, stride_wvi, bt_row,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The same on transposed tiles (S^T = K q^T, O^T += V^T P^T): keys and d fill the MMA's M
    dimension, which Hopper's warpgroup MMA wants to be >= 64 while a decode step has few query rows."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_t = tl.trans(q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kn, vn = _kv_offsets(offs_n, n_ok, bt_row, stride_kp, stride_kn, stride_vp, stride_vn, PAGED, PAGE)
        s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for j in range(HK):
            k = tl.load(k_base + j * stride_kh + kn[:, None] + offs_d[None, :] * stride_kd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            wk = tl.load(WK + j * stride_wkj + head * stride_wki, mask=row_ok, other=0.0).to(tl.float32)
            s += tl.dot(k, q_t, input_precision=DOT_PRECISION) * (wk * qk_scale)[None, :]
        s = tl.where((offs_n[:, None] >= first) & (offs_n[:, None] < row_len[None, :]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :]
        for j in range(HK):
            v = tl.load(v_base + j * stride_vh + vn[None, :] + offs_d[:, None] * stride_vd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            wv = tl.load(WV + j * stride_wvj + head * stride_wvi, mask=row_ok, other=0.0).to(tl.float32)
            acc = tl.dot(v, (p * wv[None, :]).to(v.dtype), acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return tl.trans(acc), l_i, m_i


@triton.jit
def _mea_decode_split_kernel(
    Q, K, V, WK, WV, SEQLENS, STARTS, BT, OUT, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wkj, stride_wki, stride_wvj, stride_wvi,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_pb, stride_ps, stride_pm,
    stride_lb, stride_ls, stride_btb,
    n_rows, LQ, HK, T, split_len, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr, KEYS_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # Query rows r = head * LQ + t, the order of q (B, h, Lq, d) read row-major.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    head = rows // LQ
    tok = rows % LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    seqlen = tl.minimum(tl.load(SEQLENS + b).to(tl.int32), T)
    # Keys visible to row r: [first, row_len[r]), first = the row's start (left padding) or 0.
    row_len = seqlen - LQ + 1 + tok
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seqlen)
    first = 0
    if HAS_STARTS:
        first = tl.load(STARTS + b).to(tl.int32)
        # Skip the key tiles wholly before the row's first key; tiles stay aligned to BLOCK_N (a split's
        # last tile must not reach into the next split), the partial one is masked.
        start = tl.maximum(start, (first // BLOCK_N) * BLOCK_N)

    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_ql
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Paged: K and V are pools of pages (stride_kb and stride_vb step pages) and BT maps this row's
    # logical pages to them; contiguous: K and V hold one row per batch entry.
    k_base = K if PAGED else K + b * stride_kb
    v_base = V if PAGED else V + b * stride_vb
    bt_row = BT + b * stride_btb
    if KEYS_MAJOR:
        acc, l_i, m_i = _attend_keys_major(
            q, k_base, v_base, WK, WV, head, row_ok, first, row_len, start, end, HK, qk_scale,
            stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            stride_wkj, stride_wki, stride_wvj, stride_wvi, bt_row, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
            PAGED, PAGE)
    else:
        acc, l_i, m_i = _attend_rows_major(
            q, k_base, v_base, WK, WV, head, row_ok, first, row_len, start, end, HK, qk_scale,
            stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            stride_wkj, stride_wki, stride_wvj, stride_wvi, bt_row, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
            PAGED, PAGE)

    # Rows with no visible key (empty slice, or a row shorter than its query offset) give 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DIRECT:
        tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ol
                 + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(O_PART + b * stride_pb + pid_s * stride_ps + rows[:, None] * stride_pm + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + b * stride_lb + pid_s * stride_ls + rows, lse, mask=row_ok)


@triton.jit
def _mea_decode_combine_kernel(
    O_PART, LSE_PART, OUT,
    stride_pb, stride_ps, stride_pm,
    stride_lb, stride_ls,
    stride_ob, stride_oh, stride_ol, stride_od,
    LQ, n_splits,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (query row, slice of d, batch row), all slices at once: no serial loop, so
    # even a batch of one spreads the merge over many programs.
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_ok = offs_d < D
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_splits
    # Slices that saw no key carry lse = -inf and weigh 0.
    lse = tl.load(LSE_PART + b * stride_lb + offs_s * stride_ls + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    den = tl.sum(w, 0)
    o = tl.load(O_PART + b * stride_pb + offs_s[:, None] * stride_ps + row * stride_pm + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
    head = row // LQ
    tok = row % LQ
    tl.store(OUT + b * stride_ob + head * stride_oh + tok * stride_ol + offs_d * stride_od,
             out.to(OUT.dtype.element_ty), mask=d_ok)


@lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@lru_cache(maxsize=4096)
def decode_launch_config(batch: int, n_rows: int, cache_len: int, head_dim: int, device: torch.device,
                         num_splits: int = 0, block_n: int = 0, num_warps: int = 0,
                         num_stages: int = 0, keys_major: int = -1, elem_bytes: int = 2) -> dict:
    """Tile sizes and the number of sequence slices for one launch; a nonzero argument overrides
    (``keys_major``: -1 = choose, 0 = query rows as the MMA's M dimension, 1 = keys). Cached:
    treat the returned dict as read-only.

    Slices: about two programs per multiprocessor, a power of two per row, at most 256 and at least
    two key tiles each (a sweep on an
    H200 at batch 64 x 4096 tokens put 4 slices at 0.483 ms, 8 at 0.492, auto-5 in between): enough
    loads in flight to saturate memory, while the merge (rows x d floats per slice) stays small.
    Tiles: on Hopper, keys-major 64-key tiles with 4 pipeline stages (warpgroup MMA) were the best of
    26 tile shapes; elsewhere the rows-major form with 3 stages, which fits smaller shared memory.
    """
    block_m = min(max(16, next_pow2(n_rows)), 64)
    m_blocks = cdiv(n_rows, block_m)
    # 16 KB key tiles: 64 keys at d=128 and 128 at d=64 in bf16. The size in bytes (not in keys) is what
    # must stay put: fp32, or a small head dim with keys uncapped, overflowed shared memory (234 KB
    # asked of 227 KB on an H200 for fp32 at d=16 with 512-key tiles).
    block_d = max(16, next_pow2(head_dim))
    block_n = block_n or min(128, max(32, 16384 // (block_d * elem_bytes)))
    n_blocks = max(1, cdiv(cache_len, block_n))
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    hopper = cuda and _capability(index)[0] >= 9
    if not num_splits:
        sms = sm_count(device)
        per_row = max(1, (2 * sms) // (batch * m_blocks))
        num_splits = min(1 << (per_row.bit_length() - 1), max(1, n_blocks // 2))
    num_splits = max(1, min(num_splits, n_blocks, MAX_SPLITS))
    split_len = cdiv(n_blocks, num_splits) * block_n
    num_splits = max(1, cdiv(cache_len, split_len))
    if keys_major < 0:
        keys_major = int(hopper)
    return dict(block_m=block_m, m_blocks=m_blocks, block_n=block_n, num_splits=num_splits, split_len=split_len,
                block_d=block_d, num_warps=num_warps or 4,
                num_stages=num_stages or (4 if hopper else 3), keys_major=bool(keys_major))


def _decode_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_mix: Tensor, v_mix: Tensor, cache_seqlens: Tensor,
                 cache_starts: Optional[Tensor], block_table: Optional[Tensor], scale: float, num_splits: int,
                 block_n: int, num_warps: int, num_stages: int, keys_major: int) -> Tensor:
    B, h, Lq, d = q.shape
    hk = k_cache.shape[1]
    paged = block_table is not None
    # Paged: each row can hold up to (pages in its block table) x (page size) keys.
    T = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    n_rows = h * Lq
    cfg = decode_launch_config(B, n_rows, T, d, q.device, num_splits, block_n, num_warps, num_stages, keys_major,
                               q.element_size())
    out = torch.empty((B, h, Lq, d), dtype=q.dtype, device=q.device)
    direct = cfg["num_splits"] == 1
    if direct:
        o_part = lse_part = out  # unused
        sp = (0, 0, 0)
        sl = (0, 0)
    else:
        o_part = torch.empty((B, cfg["num_splits"], n_rows, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, cfg["num_splits"], n_rows), dtype=torch.float32, device=q.device)
        sp = o_part.stride()[:3]
        sl = lse_part.stride()[:2]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (cfg["m_blocks"], cfg["num_splits"], B)
    _mea_decode_split_kernel[grid](
        q, k_cache, v_cache, k_mix, v_mix, cache_seqlens, cache_seqlens if cache_starts is None else cache_starts,
        block_table if paged else cache_seqlens,
        out, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_mix.stride(), *v_mix.stride(), *out.stride(),
        *sp, *sl, block_table.stride(0) if paged else 0,
        n_rows, Lq, hk, T, cfg["split_len"], scale * _LOG2E,
        D=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], DIRECT=direct,
        KEYS_MAJOR=cfg["keys_major"], DOT_PRECISION=precision, PAGED=paged, PAGE=k_cache.shape[2] if paged else 1,
        HAS_STARTS=cache_starts is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        block_d = min(32, cfg["block_d"])
        _mea_decode_combine_kernel[(n_rows, cdiv(d, block_d), B)](
            o_part, lse_part, out, *sp, *sl, *out.stride(), Lq, cfg["num_splits"],
            D=d, BLOCK_S=next_pow2(cfg["num_splits"]), BLOCK_D=block_d, num_warps=4,
        )
    return out


# Registered as an op so torch.compile treats the launch as one opaque node (no graph break);
# eager calls skip the op dispatcher, whose Python overhead is comparable to a small decode step.
_decode_op = torch.library.custom_op("mea::decode", mutates_args=())(_decode_impl)


@_decode_op.register_fake
def _(q, k_cache, v_cache, k_mix, v_mix, cache_seqlens, cache_starts, block_table, scale, num_splits, block_n,
      num_warps, num_stages, keys_major):
    return q.new_empty(q.shape)


def mea_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_mix: Tensor, v_mix: Tensor,
                      cache_seqlens: Optional[Tensor] = None, *, cache_starts: Optional[Tensor] = None,
                      block_table: Optional[Tensor] = None,
                      scale: Optional[float] = None, num_splits: int = 0, block_n: int = 0, num_warps: int = 0,
                      num_stages: int = 0, keys_major: int = -1) -> Tensor:
    """MEA attention of a few new tokens over a cache of component heads (the ``mea::decode`` op).

    Args:
        q: queries (B, h, Lq, d), post-RoPE; fp16, bf16 or fp32.
        k_cache: component keys (B, h', T, d), same dtype; any strides with a contiguous last dim, so
            a view ``cache.k[layer][:, :, :kv_len]`` of a longer buffer is read in place.
        v_cache: component values (B, h', T, d).
        k_mix: key mixing matrix W^K (h', h): composite key i is sum_j W^K[j, i] k_j.
        v_mix: value mixing matrix W^V (h', h).
        cache_seqlens: int (B,) keys valid for the LAST query of each row (clamped to T); query t sees
            keys ``[cache_starts[b], cache_seqlens[b] - Lq + t]``. None: every row holds T keys.
        cache_starts: int (B,) first valid key of each row (a left-padded batch keeps its padding at the
            front of the cache); None: 0 for every row.
        block_table: paged layout (as in vLLM / flash-attn's ``block_table``): int (B, max_pages); then
            ``k_cache``/``v_cache`` are pools of pages (num_pages, h', page_size, d) and key n of row b
            is slot ``n % page_size`` of page ``block_table[b, n // page_size]``; T = max_pages x
            page_size. Needs ``cache_seqlens``. Entries past a row's length are never read; the others
            must be valid page indices (not checked: that would cost a device sync per step).
        scale: softmax scale, default 1/sqrt(d).
        num_splits, block_n, num_warps, num_stages, keys_major: launch overrides (0, or -1 for
            keys_major, = chosen by ``decode_launch_config``); for tuning.

    Returns:
        (B, h, Lq, d) in the dtype of q. A query that sees no key gets zeros.
    """
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"mea_decode_triton: q, k_cache, v_cache must be 4-D (B, heads, len, d), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, h, Lq, d = q.shape
    hk = k_cache.shape[1]
    paged = block_table is not None
    if k_cache.shape != v_cache.shape or (not paged and k_cache.shape[0] != B) or k_cache.shape[3] != d:
        raise ValueError(f"mea_decode_triton: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         f"must both be " + (f"(pages, h', page_size, d={d})" if paged else f"(B={B}, h', T, d={d})"))
    if paged:
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mea_decode_triton: block_table must be int32/int64 of shape ({B}, max_pages), got "
                             f"{block_table.dtype} {tuple(block_table.shape)}")
        if cache_seqlens is None:
            raise ValueError("mea_decode_triton: a paged cache (block_table) needs cache_seqlens")
        if block_table.device != q.device:
            raise ValueError(f"mea_decode_triton: block_table is on {block_table.device}, q on {q.device}")
    if tuple(k_mix.shape) != (hk, h) or tuple(v_mix.shape) != (hk, h):
        raise ValueError(f"mea_decode_triton: k_mix {tuple(k_mix.shape)} and v_mix {tuple(v_mix.shape)} must be "
                         f"(h'={hk}, h={h})")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"mea_decode_triton: q, k_cache, v_cache must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("mea_decode_triton: the last (head_dim) dimension of q, k_cache, v_cache must be contiguous")
    devices = {t.device for t in (q, k_cache, v_cache, k_mix, v_mix)}
    if len(devices) != 1:
        raise ValueError(f"mea_decode_triton: all tensors must be on one device, got {sorted(map(str, devices))}")
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), k_cache.shape[2], dtype=torch.int32, device=q.device)
    elif cache_seqlens.shape != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mea_decode_triton: cache_seqlens must be int32/int64 of shape ({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if cache_starts is not None and (cache_starts.shape != (B,) or cache_starts.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"mea_decode_triton: cache_starts must be int32/int64 of shape ({B},), got "
                         f"{cache_starts.dtype} {tuple(cache_starts.shape)}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    op = _decode_op if torch.compiler.is_compiling() else _decode_impl
    return op(q, k_cache, v_cache, k_mix, v_mix, cache_seqlens.to(q.device).contiguous(),
              None if cache_starts is None else cache_starts.to(q.device).contiguous(),
              block_table.contiguous() if paged else None, scale, num_splits, block_n, num_warps, num_stages,
              keys_major)


def to_paged(k_cache: Tensor, v_cache: Tensor, page_size: int, spare_pages: int = 0,
             generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous caches (B, h', T, d) as the paged layout ``mea_decode_triton(block_table=...)`` reads:
    pools (pages, h', page_size, d) with the rows' pages in shuffled slots (as a serving engine leaves
    them) and ``spare_pages`` more that no row uses (random values), and the (B, ceil(T / page_size))
    int32 block table. For tests and benchmarks of the paged path, and as the layout's definition."""
    B, hk, T, d = k_cache.shape
    n = -(-T // page_size)
    used = B * n
    perm = torch.randperm(used + spare_pages, generator=generator).to(k_cache.device)[:used]

    def pool(c: Tensor) -> Tensor:
        pages = torch.nn.functional.pad(c, (0, 0, 0, n * page_size - T)).reshape(B, hk, n, page_size, d)
        out = torch.randn(used + spare_pages, hk, page_size, d, device=c.device, dtype=c.dtype)
        out[perm] = pages.permute(0, 2, 1, 3, 4).reshape(used, hk, page_size, d)
        return out

    return pool(k_cache), pool(v_cache), perm.view(B, n).to(torch.int32)
