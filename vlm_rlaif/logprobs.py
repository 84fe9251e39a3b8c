"""Per-token log-probabilities and entropies without a [tokens, vocabulary] float32 logits tensor.

PPO asks the policy, the reference and (through the rollout) the old policy for log p(token)
of every response token, and the policy for the entropy of each position. Through the model's
own head that is a [batch, length, vocabulary] logits tensor, upcast to float32 for the
log-softmax: at 7B, a vocabulary of 32k-150k and 1k-token responses, gigabytes that exist
only to be reduced to two numbers per token.

`token_logprobs` takes the hidden states and the head's weight instead and goes `chunk_rows`
tokens at a time: one matmul in the model's dtype gives a chunk of logits, a row pass reads it
once for the target's log-probability, the logsumexp and the entropy, and the chunk is freed.
The backward recomputes each chunk's logits, overwrites them in place with their gradient
(d log p_t / dz = onehot_t - p, d H / dz = -p (log p + H)) and multiplies back through the
weight. Peak extra memory is one chunk of logits, whatever the batch.

SFT's loss needs no entropy, only the labelled tokens' log-probabilities summed
(`labelled_logprob_sum`): from the hidden states of the assistant's tokens and the head's
weight, never the [batch, length, vocabulary] logits the model's own loss would build and
upcast. It goes through `token_logprobs` too; Liger-Kernel's fused linear cross-entropy is
the other backend (it writes the hidden states' gradient during the forward pass, two
matmuls a chunk where `token_logprobs` spends three, but its chunks of a few dozen rows at
vocabulary 152k left it 4x slower on an H100). Liger has no entropy, so PPO's path is this
module's own.

The row pass is a Triton kernel on CUDA (`vlm_rlaif.kernels`) and the same maths in torch
elsewhere; `backend="auto"` picks. Results match the model's own head followed by a float32
log-softmax within float rounding (tests/test_logprobs.py).
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
LossBackend = Literal["auto", "torch", "triton", "liger"]
CHUNK_ROWS = 1024


def triton_available(device: torch.device) -> bool:
    """Whether the Triton row kernels can run on `device`: CUDA with triton installed, or any
    device under TRITON_INTERPRET=1 (the CPU interpreter the tests use)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def liger_available(device: torch.device) -> bool:
    """Whether Liger-Kernel's fused linear cross-entropy can run on `device` (its kernels are Triton's)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None and triton_available(device)


def _row_stats_torch(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each row's target, entropy, logsumexp) of a chunk of logits, in float32,
    with one chunk-sized temporary beyond a float32 view of the logits. The entropy sums
    -p log p term by term: lse - sum p z, its equal, cancels away digits where logits are large."""
    z = logits.float()
    lse = torch.logsumexp(z, -1)
    p = (z - lse[:, None]).exp_()
    entropy = torch.special.entr(p, out=p).sum(-1)
    return z.gather(-1, targets[:, None]).squeeze(-1) - lse, entropy, lse


def _logit_grads_torch_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                        grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> None:
    """Overwrite a chunk of logits with d(loss)/d(logits), given the upstream gradients of
    each row's target log-probability and entropy: -p (g_logp + g_entropy (log p + H)), plus
    g_logp at the target. Two chunk-sized temporaries."""
    grad = logits.float() - lse[:, None]  # log p, becoming the gradient in place
    p = grad.exp()
    grad.mul_(grad_entropy[:, None]).add_((grad_logp + grad_entropy * entropy)[:, None]).mul_(p).neg_()
    grad.scatter_add_(-1, targets[:, None], grad_logp[:, None])
    logits.copy_(grad)


def _row_stats(logits, targets, backend):
    if backend == "triton":
        from vlm_rlaif import kernels

        return kernels.row_stats(logits, targets)
    return _row_stats_torch(logits, targets)


def _logit_grads_(logits, targets, lse, entropy, grad_logp, grad_entropy, backend) -> None:
    if backend == "triton":
        from vlm_rlaif import kernels

        kernels.logit_grads_(logits, targets, lse, entropy, grad_logp, grad_entropy)
    else:
        _logit_grads_torch_(logits, targets, lse, entropy, grad_logp, grad_entropy)


class _TokenLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> (log p [N], entropy [N]), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, backend: str):
        n = hidden.shape[0]
        logp, entropy, lse = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp[rows], entropy[rows], lse[rows] = _row_stats(hidden[rows] @ weight.T, targets[rows], backend)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_rows, ctx.backend = chunk_rows, backend
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = hidden[rows] @ weight.T
            _logit_grads_(logits, targets[rows], lse[rows], entropy[rows], grad_logp[rows].float().contiguous(),
                          grad_entropy[rows].float().contiguous(), ctx.backend)
            if want_hidden:
                grad_hidden[rows] = logits @ weight
            if want_weight:
                grad_weight += (logits.T @ hidden[rows]).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk_rows: int = CHUNK_ROWS, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) and the entropy at every position, float32, shaped like `targets`.

    hidden: [..., H] states that the head (`weight` [V, H], no bias) turns into next-token
    logits; targets: [...] token ids. Differentiable in `hidden` and `weight`.
    """
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}: "
                         "want hidden [..., H], weight [V, H], targets shaped like hidden without H")
    if chunk_rows < 1:
        raise ValueError(f"token_logprobs: chunk_rows must be >= 1, got {chunk_rows}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton_available(hidden.device) else "torch"
    elif backend == "triton" and not triton_available(hidden.device):
        raise ValueError(f"token_logprobs: the triton backend needs CUDA (or TRITON_INTERPRET=1), got a {hidden.device.type} tensor")
    elif backend not in ("torch", "triton"):
        raise ValueError(f"token_logprobs: unknown backend {backend!r}; use 'auto', 'torch' or 'triton'")
    flat = targets.reshape(-1).long()
    if flat.numel():
        low, high = torch.stack(torch.aminmax(flat)).tolist()  # one pass over the ids, one host sync
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"token_logprobs: target ids must lie in [0, {weight.shape[0]}), got [{low}, {high}]")
    logp, entropy = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, flat.contiguous(), chunk_rows, backend)
    return logp.view(targets.shape), entropy.view(targets.shape)


def labelled_logprob_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                         chunk_rows: int = CHUNK_ROWS, backend: LossBackend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(next token) over the labelled positions, their count): a causal language
    model's loss numerator and denominator from hidden states [B, L, H] and labels [B, L]
    (`ignore_index` where unlabelled), shifted as the model's own loss shifts them. "auto" is
    `token_logprobs`'s choice; "liger" is Liger-Kernel's fused linear cross-entropy, which
    peaks lower at vocabulary 152k but ran slower at the paper's shapes on an H100
    (benchmarks/sft_loss.py)."""
    if backend == "liger" and not liger_available(hidden.device):
        raise ValueError(f"labelled_logprob_sum: the liger backend needs liger-kernel and CUDA (or TRITON_INTERPRET=1), "
                         f"got a {hidden.device.type} tensor")
    targets = labels[:, 1:]
    keep = targets != ignore_index
    rows, wanted = hidden[:, :-1][keep], targets[keep]  # the labelled positions only: SFT's rows are mostly video
    if backend == "liger" and len(rows):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return -liger_fused_linear_cross_entropy(rows, weight, wanted, reduction="sum"), keep.sum()
    logp, _ = token_logprobs(rows, weight, wanted, chunk_rows=chunk_rows, backend="torch" if backend == "liger" else backend)
    return logp.sum(), keep.sum()


def mean_logprob_per_row(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """[B] mean log p(token) over each row's masked tokens (`mask` [B, L] marks the tokens
    scored, e.g. a response), from hidden states [B, L, H]; only those rows meet the head."""
    keep = mask[:, 1:].bool().to(hidden.device)  # the state before a token predicts it
    logp, _ = token_logprobs(hidden[:, :-1][keep], weight, input_ids[:, 1:].to(hidden.device)[keep])
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(keep), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums / keep.sum(1).clamp(min=1)

