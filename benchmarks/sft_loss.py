"""SFT's loss, forward and backward from the final hidden states: the model's own loss against
the stage's fused ones, in time and peak memory, measured in one run.

An SFT batch at the paper's shape is mostly video: 16 frames of 144 tokens, a question, and an
answer of a few hundred tokens, the only labelled part. Compared, for `--batch` rows of
`--length` tokens whose last `--answer` are labelled:
- model's own loss: the head over every position, then transformers' causal-LM loss (the
  logits upcast to float32, cross-entropy over the shifted labels);
- chunked: `vlm_rlaif.logprobs.labelled_logprob_sum` over the labelled positions only, chunk by
  chunk through this package's row pass (the Triton kernels on CUDA), what
  `sft.CheckpointTrainer` computes;
- liger (CUDA only): the same positions through Liger-Kernel's fused linear cross-entropy,
  the other backend of `labelled_logprob_sum`.
Peak memory is what each step allocates above its inputs (CUDA's allocator peak on a GPU, the
peak of live tensor bytes on CPU; see benchmarks/logprobs.py).

    python benchmarks/sft_loss.py                               # CPU: float32, hidden 1024
    python benchmarks/sft_loss.py --vocab 32064 151936          # on a GPU: bf16, hidden 4096
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from logprobs import LiveTensors
from vlm_rlaif.logprobs import labelled_logprob_sum, liger_available


def batch(rows: int, length: int, answer: int, hidden: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, length, hidden, generator=g, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) / hidden**0.5
    labels = torch.full((rows, length), -100, device=device)
    labels[:, -answer:] = torch.randint(0, vocab, (rows, answer), generator=g, device=device)
    return h, w, labels


def step(backend: str | None, h, w, labels) -> None:
    """One forward and backward: `labelled_logprob_sum` on `backend`, or with None the model's own loss."""
    items = (labels[:, 1:] != -100).sum()
    if backend:
        total, _ = labelled_logprob_sum(h, w, labels, backend=backend)
        loss = -total / items
    else:
        loss = ForCausalLMLoss(h @ w.T, labels, vocab_size=w.shape[0], num_items_in_batch=items)
    loss.backward()


def measure(backend: str | None, h, w, labels, repeats: int) -> dict:
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(backend, h, w, labels)  # also the warm-up
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveTensors(h, w, labels) as seen:
            step(backend, h, w, labels)
        peak = seen.peak
    start = time.perf_counter()
    for _ in range(repeats):
        h.grad = None
        step(backend, h, w, labels)
    if h.is_cuda:
        torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - start) / repeats, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2600, help="tokens a row: 16 frames x 144, a question, the answer")
    parser.add_argument("--answer", type=int, default=256, help="labelled tokens at the end of each row")
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32064])
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--repeats", type=int, default=5 if cuda else 2)
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}: {args.batch} rows of {args.length} tokens, {args.answer} labelled, hidden {args.hidden}, {args.dtype}, "
          "forward + backward")
    variants = {"model's own loss": None, "chunked": "triton" if cuda else "torch"}  # name -> labelled_logprob_sum's backend
    if cuda and liger_available(torch.device(device)):
        variants["liger"] = "liger"
    for vocab in args.vocab:
        print(f"vocabulary {vocab}:")
        h, w, labels = batch(args.batch, args.length, args.answer, args.hidden, vocab, getattr(torch, args.dtype), device)
        results = {name: measure(backend, h, w, labels, args.repeats) for name, backend in variants.items()}
        for variant, r in results.items():
            print(f"  {variant:20s} {r['seconds'] * 1e3:9.1f} ms   peak {r['peak_bytes'] / 2**20:9.1f} MiB")
        theirs = results["model's own loss"]
        for variant in list(variants)[1:]:
            ours = results[variant]
            print(f"  {variant} against the model's own loss: {theirs['seconds'] / ours['seconds']:.2f}x as fast, "
                  f"{theirs['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x less peak memory")


if __name__ == "__main__":
    main()
