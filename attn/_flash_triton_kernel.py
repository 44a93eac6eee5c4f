"""The Triton kernel of :mod:`attn.flash_triton` (imported only where Triton is installed).

Kept apart because Triton reads the ``tl.constexpr`` annotations of the kernel's parameters, which
``from __future__ import annotations`` (used by the rest of the package) would turn into strings.
The algorithm and the symbols are described in :mod:`attn.flash_triton`.
"""

import triton
import triton.language as tl


@triton.jit
def flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, d, d_v, scale,
                     stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
                     CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program: query block ``program_id(0)`` of ``(batch x head)`` ``program_id(1)``; see the module."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # the query rows of this program
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < n_q
    q = tl.load(q_ptr + bh * stride_qb + rows[:, None] * stride_qn + dk[None, :],
                mask=row_ok[:, None] & (dk[None, :] < d), other=0.0).to(tl.float32)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max
    ell = tl.zeros([BLOCK_Q], tl.float32)  # running sum of exp(s - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)  # running sum of exp(s - m) v
    k_end = n_k
    if CAUSAL:  # key blocks after the last query of the block are skipped (top-left aligned, as SDPA)
        k_end = tl.minimum(n_k, (pid_q + 1) * BLOCK_Q)
    for k_lo in range(0, k_end, BLOCK_K):
        cols = k_lo + tl.arange(0, BLOCK_K)
        col_ok = cols < n_k
        k = tl.load(k_ptr + bh * stride_kb + cols[:, None] * stride_kn + dk[None, :],
                    mask=col_ok[:, None] & (dk[None, :] < d), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_Q, BLOCK_K): one tile of scores
        visible = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        gamma = tl.exp(m - m_safe)  # rescales what was accumulated under the old max
        ell = gamma * ell + tl.sum(p, 1)
        v = tl.load(v_ptr + bh * stride_vb + cols[:, None] * stride_vn + dv[None, :],
                    mask=col_ok[:, None] & (dv[None, :] < d_v), other=0.0).to(tl.float32)
        acc = gamma[:, None] * acc + tl.dot(p, v, input_precision="ieee")
        m = m_new
    seen = ell > 0
    out = acc / tl.where(seen, ell, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, ell, 1.0)), float("-inf"))
    tl.store(o_ptr + bh * stride_ob + rows[:, None] * stride_on + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < d_v))
    tl.store(lse_ptr + bh * n_q + rows, lse, mask=row_ok)
