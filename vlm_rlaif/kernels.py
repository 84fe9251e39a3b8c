"""Triton row kernels behind `vlm_rlaif.logprobs`: one program per row of a chunk of logits.

`row_stats` reads a row once, in vocabulary tiles. Each lane of a tile keeps its own online
maximum m, sum s = sum exp(z - m) and w = sum exp(z - m) z, so the loop holds no reduction
across threads and spends one exponential a logit; whole tiles load without masks, and the
lanes are merged once at the end: logsumexp = M + log S, log p_t = z_t - logsumexp,
entropy = logsumexp - W / S. `logit_grads_` reads the row again and writes d(loss)/dz over
it. Logits stay in the model's dtype in memory; the arithmetic is float32. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors, which is how the tests check them
against torch on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch settings, the fastest measured on an H100 at vocabularies 32k and 152k (benchmarks/README.md):
# tile width, warps a program and, for the forward, the depth of its pipelined loads.
ROW_STATS = {"BLOCK": 2048, "num_warps": 4, "STAGES": 4}
LOGIT_GRADS = {"BLOCK": 4096, "num_warps": 16}


@triton.jit
def _online(m, s, w, z):
    """One tile into each lane's running (max, sum, weighted sum): exp(-|z - m|) is z's own
    term when z <= m and the lane's rescale when z is its new maximum."""
    x = tl.exp(-tl.abs(z - m))
    grew = z > m
    return tl.maximum(m, z), tl.where(grew, s * x + 1.0, s + x), tl.where(grew, w * x + z, w + x * z)


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, vocab, stride, BLOCK: tl.constexpr,
                      STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start_ptr = logits_ptr + row * stride
    z_target = tl.load(start_ptr + tl.load(targets_ptr + row)).to(tl.float32)  # first: its latency hides behind the loop
    offsets = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    full = vocab - vocab % BLOCK
    for start in tl.range(0, full, BLOCK, num_stages=STAGES):  # whole tiles, no masks
        m, s, w = _online(m, s, w, tl.load(start_ptr + start + offsets).to(tl.float32))
    if full < vocab:
        inside = full + offsets < vocab
        z = tl.load(start_ptr + full + offsets, mask=inside, other=0.0).to(tl.float32)  # finite: no NaN in discarded lanes
        m_tail, s_tail, w_tail = _online(m, s, w, z)
        m, s, w = tl.where(inside, m_tail, m), tl.where(inside, s_tail, s), tl.where(inside, w_tail, w)
    top = tl.max(m, 0)
    scale = tl.exp(m - top)  # 0 for lanes that never held a logit
    total = tl.sum(s * scale, 0)
    lse = top + tl.log(total)
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(entropy_ptr + row, lse - tl.sum(w * scale, 0) / total)
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


def _launch(settings: dict, vocab: int) -> dict:
    """`settings` with the tile no wider than the vocabulary needs."""
    return settings | {"BLOCK": min(settings["BLOCK"], triton.next_power_of_2(vocab))}


def row_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each row's target, entropy, logsumexp), float32, for logits [N, V]."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    logp, entropy, lse = (torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(3))
    if n:
        _row_stats_kernel[(n,)](logits, targets.contiguous(), logp, entropy, lse, vocab, logits.stride(0), **_launch(ROW_STATS, vocab))
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
                                  **_launch(LOGIT_GRADS, vocab))
