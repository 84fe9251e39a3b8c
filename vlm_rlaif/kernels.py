"""Triton row kernels behind `vlm_rlaif.logprobs`: one program per row of a chunk of logits.

`row_stats` reads a row once, in vocabulary tiles, keeping an online maximum m, the sum
s = sum exp(z - m) and w = sum exp(z - m) z (both rescaled when m grows), and picks the
target's logit on the way: logsumexp = m + log s, log p_t = z_t - logsumexp, entropy =
logsumexp - w / s. `logit_grads_` reads the row again and writes d(loss)/dz over it. Logits
stay in the model's dtype in memory; the arithmetic is float32. Under TRITON_INTERPRET=1 the
same kernels run on CPU tensors, which is how the tests check them against torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, vocab, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    m = -float("inf")
    s = 0.0
    w = 0.0
    z_target = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(start_ptr + cols, mask=inside, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.where(inside, tl.exp(z - m_new), 0.0)
        s = s * rescale + tl.sum(e, 0)
        w = w * rescale + tl.sum(e * tl.where(inside, z, 0.0), 0)
        z_target += tl.sum(tl.where(cols == target, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(entropy_ptr + row, lse - w / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logit_grads_kernel(logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, vocab, stride,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        logp = tl.load(start_ptr + cols, mask=inside, other=0.0).to(tl.float32) - lse
        p = tl.exp(logp)
        grad = -p * (g_logp + g_entropy * (logp + entropy)) + tl.where(cols == target, g_logp, 0.0)
        tl.store(start_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def _block(vocab: int) -> int:
    return min(BLOCK, triton.next_power_of_2(vocab))


def row_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each row's target, entropy, logsumexp), float32, for logits [N, V]."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    logp, entropy, lse = (torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(3))
    if n:
        _row_stats_kernel[(n,)](logits, targets.contiguous(), logp, entropy, lse, vocab, logits.stride(0), BLOCK=_block(vocab))
    return logp, entropy, lse


def logit_grads_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                 grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> None:
    """Overwrite logits [N, V] (contiguous rows) with d(loss)/d(logits) for the upstream
    gradients of each row's target log-probability and entropy (float32 [N])."""
    if logits.stride(-1) != 1:
        raise ValueError("logit_grads_: logits rows must be contiguous")
    n, vocab = logits.shape
    if n:
        _logit_grads_kernel[(n,)](logits, targets.contiguous(), lse, entropy, grad_logp, grad_entropy, vocab, logits.stride(0),
                                  BLOCK=_block(vocab))
