r"""Chapter 25 -- the FlashAttention forward as a Triton kernel: the algorithm of :mod:`attn.flash`, one program per tile row.

:func:`attn.flash.flash_forward` runs the tiled online softmax as Python loops over torch operations:
every operation reads its operands from memory and writes its result back. A GPU kernel runs the
same loop with the query block, the statistics and the accumulator held on chip. Here one Triton
program owns one query block ``Q_i`` (``BLOCK_Q`` rows) of one ``(batch, head)`` and streams the key
and value blocks past it (FlashAttention-2's order, Dao 2023):

.. math::

    S = Q_i K_j^\top / \sqrt d, \quad m' = \max(m, \max_c S_{:,c}), \quad
    \tilde P = e^{S - m'}, \quad \gamma = e^{m - m'}, \\
    \ell \leftarrow \gamma \ell + \textstyle\sum_c \tilde P_{:,c}, \quad
    o \leftarrow \gamma\, o + \tilde P V_j, \quad m \leftarrow m',

and at the end writes ``O_i = o / ell`` and ``L_i = m + log ell`` (Dao et al. 2022, Algorithm 1;
Milakov & Gimelshein 2018). ``S`` and ``P`` exist only as one ``(BLOCK_Q, BLOCK_K)`` tile in registers.

Shapes: ``q (B, [H,] n_q, d)``, ``k (B, [H,] n_k, d)``, ``v (B, [H,] n_k, d_v)`` -> ``(B, [H,] n_q, d_v)``
and the log-sum-exp ``(B, [H,] n_q)``. The backward of :func:`triton_flash_attention` is
:func:`attn.flash.flash_backward`, recomputing the tiles from the saved log-sum-exp.

**Where it runs.** On CUDA tensors Triton compiles the kernel for the GPU. With ``TRITON_INTERPRET=1``
set before Triton is imported, it runs in Triton's interpreter instead (the same kernel source
executed with NumPy, one program at a time), on CPU tensors too: this checks the algorithm and the
index arithmetic, not the speed. Triton is optional (``pip install triton``,
Linux x86-64); :func:`triton_available` says whether it is importable.

Dao, Fu, Ermon, Rudra, Ré, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", NeurIPS 2022. Dao, "FlashAttention-2", arXiv 2023. Tillet, Kung, Cox, "Triton: an
intermediate language and compiler for tiled neural network computations", MAPL 2019.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_int, check_same_dtype
from .core import check_qkv
from .flash import flash_backward

__all__ = ["triton_available", "interpreted", "kernel_source", "triton_flash_forward", "triton_flash_attention", "TritonFlashFunction"]

try:  # optional: the chapter and the tests run it where it is installed
    import triton

    from ._flash_triton_kernel import flash_fwd_kernel
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def triton_available() -> bool:
    """Whether Triton is importable (then CUDA tensors compile and CPU tensors run interpreted)."""
    return triton is not None


def kernel_source() -> str:
    """The source of the Triton kernel (``attn/_flash_triton_kernel.py``), readable without Triton installed."""
    from pathlib import Path

    text = (Path(__file__).with_name("_flash_triton_kernel.py")).read_text()
    return text[text.index("@triton.jit"):]


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` when Triton was imported)."""
    return triton is not None and type(flash_fwd_kernel).__name__ == "InterpretedFunction"


def triton_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                         block_q: int = 64, block_k: int = 64) -> tuple[Tensor, Tensor]:
    """The forward of FlashAttention as one Triton launch: ``(output (B, H, n_q, d_v), lse (B, H, n_q) float32)``.

    ``q, k, v``: ``(B, H, n, d)`` on one device (CUDA: compiled; CPU: Triton's interpreter), float32,
    float16 or bfloat16 (the tile arithmetic is float32). ``block_q, block_k``: powers of two >= 16.
    Causal is SDPA's ``is_causal`` (query ``i`` sees keys ``j <= i``). No padding mask: use
    :func:`attn.flash.flash_attention` for one.
    """
    if triton is None:
        raise RuntimeError("triton_flash_forward needs Triton: `pip install triton` (Linux x86-64); "
                           "attn.flash.flash_attention is the same algorithm in plain torch")
    check_qkv(q, k, v)
    check_same_dtype(("query", q), ("key", k), ("value", v))
    if q.ndim != 4:
        raise ValueError(f"triton_flash_forward expects q, k, v of shape (B, H, n, d), got {q.ndim}-D {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton_flash_forward supports float32, float16 and bfloat16, got {q.dtype}")
    if q.device.type == "cpu" and not interpreted():
        raise RuntimeError("CPU tensors run in Triton's interpreter, which is chosen when Triton is first imported: "
                           "set the environment variable TRITON_INTERPRET=1 before importing torch.utils.flop_counter, "
                           "triton or attn.flash_triton (or pass CUDA tensors)")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"triton_flash_forward runs on CUDA (compiled) or CPU (interpreted), got {q.device}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        check_int(name, b, low=16)
        if b & (b - 1):
            raise ValueError(f"{name} must be a power of two (Triton's tl.arange), got {b}")
    batch, heads, n_q, d = q.shape
    n_k, d_v = k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf, kf, vf = (t.reshape(batch * heads, t.shape[-2], t.shape[-1]).contiguous() for t in (q, k, v))
    out = q.new_empty(batch * heads, n_q, d_v)
    lse = q.new_empty(batch * heads, n_q, dtype=torch.float32)
    grid = (triton.cdiv(n_q, block_q), batch * heads)
    flash_fwd_kernel[grid](
        qf, kf, vf, out, lse, n_q, n_k, d, d_v, scale,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        out.stride(0), out.stride(1),
        CAUSAL=bool(causal), BLOCK_Q=block_q, BLOCK_K=block_k,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
    )
    return out.view(batch, heads, n_q, d_v), lse.view(batch, heads, n_q)


class TritonFlashFunction(torch.autograd.Function):
    """Forward: :func:`triton_flash_forward`; backward: :func:`attn.flash.flash_backward` from ``O`` and ``L``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
                block_q: int, block_k: int) -> Tensor:
        out, lse = triton_flash_forward(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(grad_out.contiguous(), q, k, v, out, lse.to(q.dtype), ctx.causal, ctx.scale,
                                    *ctx.blocks)
        return dq, dk, dv, None, None, None, None


def triton_flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64) -> Tensor:
    """Exact attention ``softmax(Q K^T scale) V`` with the Triton forward and the tiled backward.

    ``q, k, v``: ``(B, [H,] n, d)``; returns ``(B, [H,] n_q, d_v)``. Equal to
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)``.
    """
    check_qkv(q, k, v)
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[:, None], k[:, None], v[:, None]
    out = TritonFlashFunction.apply(q, k, v, bool(causal), scale, block_q, block_k)
    return out[:, 0] if squeeze else out
