"""Triton row kernels behind `vlm_rlaif.logprobs`: one program per row of a chunk of logits.

`row_stats` reads a row once, in vocabulary tiles of GROUP-logit groups, GROUP being what one
thread loads in a single 16-byte access of bf16. Each group keeps its own online maximum m, sum
s = sum exp(z - m) and w = sum exp(z - m) z; a tile moves a group's maximum once and adds its
logits' terms, so the loop spends one exponential a logit (plus one a group), reduces only
within a thread and loads whole tiles without masks. The groups merge once at the end:
logsumexp = M + log S, log p_t = z_t - logsumexp, entropy = logsumexp - W / S. Exponentials
are base 2, which compile to the bare hardware instruction. `logit_grads_` reads the row
again and writes d(loss)/dz over it. Logits stay in the model's dtype in memory; the
arithmetic is float32. Logits must be finite. Under TRITON_INTERPRET=1 the same kernels run
on CPU tensors, which is how the tests check them against torch on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel

# Launch settings: tile width, warps a program and, for the forward, logits a group (one
# thread's 16-byte load of bf16) and the depth of its pipelined loads; tile, warps and depth
# from a sweep on an H100 at vocabularies 32k and 152k (benchmarks/README.md).
ROW_STATS = {"BLOCK": 2048, "GROUP": 8, "num_warps": 4, "STAGES": 4}
LOGIT_GRADS = {"BLOCK": 4096, "num_warps": 16}
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e)
PAD = tl.constexpr(-1e30)  # a missing logit: exp(PAD - m) is 0 where -inf - -inf would be NaN


@triton.jit
def _merge(m, s, w, z):
    """A tile z [groups, GROUP] into each group's running (max, sum, weighted sum)."""
    top = tl.maximum(m, tl.max(z, 1))
    shift = top * LOG2E
    x = tl.exp2(z * LOG2E - shift[:, None])
    rescale = tl.exp2(m * LOG2E - shift)
    return top, s * rescale + tl.sum(x, 1), w * rescale + tl.sum(x * z, 1)


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, vocab, stride, BLOCK: tl.constexpr,
                      GROUP: tl.constexpr, STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start_ptr = logits_ptr + row * stride
    z_target = tl.load(start_ptr + tl.load(targets_ptr + row)).to(tl.float32)  # first: its latency hides behind the loop
    offsets = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = tl.full([BLOCK // GROUP], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK // GROUP], tl.float32)
    w = tl.zeros([BLOCK // GROUP], tl.float32)
    full = vocab - vocab % BLOCK
    for start in tl.range(0, full, BLOCK, num_stages=STAGES):  # whole tiles, no masks
        m, s, w = _merge(m, s, w, tl.load(start_ptr + start + offsets).to(tl.float32))
    if full < vocab:
        inside = full + offsets < vocab
        # a group past the vocabulary sums only PADs; its exp(PAD - M) weight below is 0
        m, s, w = _merge(m, s, w, tl.where(inside, tl.load(start_ptr + full + offsets, mask=inside).to(tl.float32), PAD))
    top = tl.max(m, 0)
    scale = tl.exp(m - top)
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
    """`settings` with the tile no wider than the vocabulary needs, and its groups no wider than the tile."""
    block = min(settings["BLOCK"], triton.next_power_of_2(vocab))
    return settings | {"BLOCK": block} | ({"GROUP": min(settings["GROUP"], block)} if "GROUP" in settings else {})


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


def ahead_of_time(dtype: torch.dtype, capability: int = 90) -> dict[str, CompiledKernel]:
    """Both kernels compiled, as `row_stats` and `logit_grads_` launch them on logits of `dtype`,
    for a GPU of this compute capability (90: H100, H200) on a machine without one, so that
    the GPU compiler's verdict and code can be checked anywhere. Vocabulary and row stride are
    taken as multiples of 16, as at launch for every vocabulary of the paper's models."""
    if not isinstance(_row_stats_kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels.ahead_of_time: the kernels are interpreted (TRITON_INTERPRET=1); compile them in a process without it")
    pointers = {"logits_ptr": "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype],
                "targets_ptr": "*i64", "vocab": "i32", "stride": "i32"}
    compiled = {}
    for name, kernel, settings in (("row_stats", _row_stats_kernel, ROW_STATS), ("logit_grads_", _logit_grads_kernel, LOGIT_GRADS)):
        constexprs = {k: v for k, v in settings.items() if k != "num_warps"}
        signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "*fp32") for arg in kernel.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names) if arg not in constexprs}
        source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
        compiled[name] = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": settings["num_warps"]})
    return compiled
