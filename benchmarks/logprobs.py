"""Per-token log-probs + entropy, forward and backward: this package's chunked path against the
model head's full logits, in time and peak memory, all measured in one run.

Compared, for `tokens` response tokens with hidden size H and vocabulary V:
- head + float32 log-softmax: what `model(...).logits.float()` then log_softmax and entropy
  cost (the path PPO took before `vlm_rlaif.logprobs`);
- head + trl: the same logits in the model's dtype through trl's
  `selective_log_softmax_and_entropy` (a Triton kernel on CUDA, chunked torch elsewhere);
- chunked: `vlm_rlaif.logprobs.token_logprobs` from the hidden states, `--chunk-rows` at a time.
Each reports seconds per forward + backward and the peak memory it allocates above its
inputs: CUDA's allocator peak on a GPU, the peak of live tensor bytes on CPU. On CUDA the
Triton row kernels alone are timed on [tokens, V] logits too, their bandwidth given as a
share of the GPU's peak.

    python benchmarks/logprobs.py                       # CPU: float32, 4096 tokens, H 1024, V 32064
    python benchmarks/logprobs.py --vocab 32064 151936  # on a GPU: bf16, 4096 tokens, H 4096
"""

from __future__ import annotations

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_rlaif.logprobs import CHUNK_ROWS

VARIANTS = ("head + float32 log-softmax", "head + trl", "chunked")
# Peak HBM bandwidth (bytes/s) by device name, from the vendors' data sheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12}


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) / hidden**0.5)
    t = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return h, w, t


def step(variant: str, h, w, t, chunk_rows: int) -> None:
    """One forward and backward of log p(t) + entropy, as the PPO policy loss needs them."""
    if variant == "chunked":
        from vlm_rlaif.logprobs import token_logprobs

        logp, entropy = token_logprobs(h, w, t, chunk_rows=chunk_rows)
    elif variant == "head + trl":
        from trl.trainer.utils import selective_log_softmax_and_entropy

        logp, entropy = selective_log_softmax_and_entropy(h @ w.T, t)
    else:
        all_logp = torch.log_softmax((h @ w.T).float(), -1)
        logp, entropy = all_logp.gather(-1, t[:, None]).squeeze(-1), -(all_logp.exp() * all_logp).sum(-1)
    (logp.float().sum() + 0.01 * entropy.float().sum()).backward()


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the storages alive at once among those created inside the block (views
    share their storage's count; the inputs' storages are not counted): the CPU stand-in for
    CUDA's allocator peak, which resident memory would blur with the allocator's caches."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in inputs}
        self.sizes: dict[int, int] = {}
        self.holders: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key == 0 or key in self.outside:
            return
        if key not in self.sizes:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.holders[key] = self.holders.get(key, 0) + 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= self.sizes.pop(key)


def measure(variant: str, h, w, t, chunk_rows: int, repeats: int) -> dict:
    """Seconds per step, and peak bytes the step allocates above its inputs."""
    cuda = h.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant, h, w, t, chunk_rows)  # also the warm-up: Triton compiles here
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveTensors(h, w, t) as seen:
            step(variant, h, w, t, chunk_rows)
        peak = seen.peak
    start = time.perf_counter()
    for _ in range(repeats):
        h.grad = None
        step(variant, h, w, t, chunk_rows)
    sync()
    return {"seconds": (time.perf_counter() - start) / repeats, "peak_bytes": peak}


def kernel_bandwidth(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[float, float]:
    """(forward, backward) bytes per second of the Triton row kernels alone on [tokens, vocab]
    logits: the forward reads them once, the backward reads and writes them once."""
    from triton.testing import do_bench

    from vlm_rlaif import kernels

    logits = torch.randn(tokens, vocab, device="cuda", dtype=dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    logp, entropy, lse = kernels.row_stats(logits, targets)
    grads = torch.ones(tokens, device="cuda"), torch.ones(tokens, device="cuda")
    size = logits.numel() * logits.element_size()
    forward = do_bench(lambda: kernels.row_stats(logits, targets), return_mode="median") / 1e3  # the median: a host stall skews a mean
    backward = do_bench(lambda: kernels.logit_grads_(logits, targets, lse, entropy, *grads), return_mode="median") / 1e3
    return size / forward, 2 * size / backward


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32064])
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    parser.add_argument("--repeats", type=int, default=5 if cuda else 2)
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"

    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}: {args.tokens} tokens, hidden {args.hidden}, {args.dtype}, chunks of {args.chunk_rows} rows, forward + backward")
    for vocab in args.vocab:
        print(f"vocabulary {vocab}:")
        h, w, t = inputs(args.tokens, args.hidden, vocab, getattr(torch, args.dtype), device)
        results = {}
        for variant in VARIANTS:
            results[variant] = r = measure(variant, h, w, t, args.chunk_rows, args.repeats)
            print(f"  {variant:28s} {r['seconds'] * 1e3:9.1f} ms   peak {r['peak_bytes'] / 2**20:9.1f} MiB")
        for variant in VARIANTS[:2]:
            ours, theirs = results["chunked"], results[variant]
            print(f"  chunked against {variant}: {theirs['seconds'] / ours['seconds']:.2f}x as fast, "
                  f"{theirs['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x less peak memory")
        if cuda:
            forward, backward = kernel_bandwidth(args.tokens, vocab, getattr(torch, args.dtype))
            peak = peak_bandwidth(name)
            share = (lambda b: f" ({b / peak:.0%} of {peak / 1e12:.2f} TB/s)") if peak else (lambda b: "")
            print(f"  row kernel alone: forward {forward / 1e9:.0f} GB/s{share(forward)}, backward {backward / 1e9:.0f} GB/s{share(backward)}")


if __name__ == "__main__":
    main()
