"""Per-token log-probs and entropies from hidden states: the torch path and the Triton kernels
(compiled on a GPU, else on CPU under TRITON_INTERPRET=1, set in conftest) against the model head + float32
log-softmax, forward and backward, and the chunking that keeps full logits from existing;
SFT's labelled sum on each backend, Liger's fused linear cross-entropy included."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_rlaif.logprobs import _row_stats_torch, labelled_logprob_sum, token_logprobs

TRITON = importlib.util.find_spec("triton") is not None  # Linux wheels of torch bring it; elsewhere it may be missing
BACKENDS = ["torch", *(["triton"] if TRITON else [])]
LOSS_BACKENDS = [*BACKENDS, *(["liger"] if TRITON and importlib.util.find_spec("liger_kernel") else [])]
needs_triton = pytest.mark.skipif(not TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels run compiled; on CPU under the interpreter
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's own head gives: logits in the model's dtype, log-softmax in float32."""
    logp = torch.log_softmax((hidden @ weight.T).float(), -1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def problem(batch: int, length: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(batch, length, hidden, generator=g) * 2).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    return h, w, t


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 300.0])  # logits far from 0: the kernel's shifts must not lose them
@pytest.mark.parametrize("rows, vocab", [(1, 1), (7, 5), (5, 20), (33, 4099), (3, 8192)])  # 20: groups past the vocabulary
def test_row_kernel_matches_torch(rows, vocab, offset, dtype):
    from vlm_rlaif import kernels

    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=g) * 4 + offset).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    resolution = 4 * torch.finfo(torch.float32).eps * offset  # float32's own spacing at the logits' magnitude
    for got, want in zip(kernels.row_stats(logits, targets), _row_stats_torch(logits, targets)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 + resolution)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_compile_for_a_hopper_gpu(dtype):
    """The interpreter runs Python that the GPU compiler refuses (a global that is no constexpr,
    say): compiling for sm_90, in a process where the kernels are not interpreted, catches it
    on a machine without a GPU."""
    script = (f"import json, torch; from vlm_rlaif import kernels; c = kernels.ahead_of_time(torch.{str(dtype).split('.')[1]}); "
              "print(json.dumps({name: [len(k.asm['cubin']), 'cp.async' in k.asm['ptx']] for name, k in c.items()}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.splitlines()[-1])
    assert sorted(compiled) == ["logit_grads_", "row_stats"] and all(size > 0 for size, _ in compiled.values())
    assert compiled["row_stats"][1]  # the forward's tiles arrive through pipelined copies (cp.async)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 9, 16, 300), (1, 1, 8, 3), (3, 17, 24, 1031)])
def test_forward_and_backward_match_the_models_head(shape, backend, dtype):
    h, w, t = problem(*shape, dtype)
    g = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = (torch.randn(t.shape, generator=g).to(DEVICE) for _ in range(2))
    mask = (torch.rand(t.shape, generator=g) > 0.3).to(DEVICE)  # response tokens after EOS carry no gradient
    results = []
    for compute in (lambda: token_logprobs(h, w, t, chunk_rows=5, backend=backend), lambda: reference(h, w, t)):
        h.grad = w.grad = None
        logp, entropy = compute()
        ((logp * grad_logp + entropy * grad_entropy) * mask).sum().backward()
        results.append((logp.detach(), entropy.detach(), h.grad.clone(), w.grad.clone()))
    for name, got, want in zip(("logp", "entropy", "grad hidden", "grad weight"), *results):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("shape, frozen_head", [((2, 9, 16, 300), True), ((3, 17, 24, 1031), False)])
def test_the_labelled_sum_matches_the_models_loss(shape, frozen_head, backend, dtype):
    """SFT's numerator and count: the model head's float32 cross-entropy over the shifted
    labelled positions, value and gradients, whichever backend computes it."""
    h, w, t = problem(*shape, dtype)
    w.requires_grad_(not frozen_head)
    labels = torch.where(torch.rand(t.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.4, t, -100)
    results = []
    for compute in (lambda: labelled_logprob_sum(h, w, labels, chunk_rows=5, backend=backend), lambda: model_loss_sum(h, w, labels)):
        h.grad = w.grad = None
        total, count = compute()
        (total * -0.37).backward()  # the loss scales the sum by -1 / count
        results.append((total.detach(), count, h.grad.clone(), None if frozen_head else w.grad.clone()))
    for name, got, want in zip(("sum", "count", "grad hidden", "grad weight"), *results):
        if want is not None:
            torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype], msg=name)
    assert results[0][2][:, -1].abs().sum() == 0  # the last position predicts nothing


def model_loss_sum(hidden, weight, labels):
    logits = (hidden[:, :-1] @ weight.T).float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return -loss, (targets != -100).sum()


def test_the_labelled_sum_takes_no_labels_and_names_a_backend_it_cannot_run(monkeypatch):
    h, w, t = problem(1, 6, 8, 20, torch.float32)
    total, count = labelled_logprob_sum(h, w, torch.full_like(t, -100), backend=LOSS_BACKENDS[-1])
    assert total.item() == 0 and count.item() == 0
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, t = problem(1, 6, 8, 20, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="the liger backend needs liger-kernel and CUDA"):
        labelled_logprob_sum(h, w, t, backend="liger")
    calls = []
    monkeypatch.setattr("vlm_rlaif.logprobs.token_logprobs", lambda *a, **k: calls.append(k["backend"]) or token_logprobs(*a, **k))
    labelled_logprob_sum(h, w, t)
    assert calls == ["auto"]  # on CPU "auto" is the chunked path, never Liger


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    h, w, t = problem(2, 6, 8, 50, torch.float32)
    w.requires_grad_(False)
    logp, _ = token_logprobs(h, w, t, chunk_rows=4)
    logp.sum().backward()
    assert w.grad is None and h.grad is not None and h.grad.abs().sum() > 0


def test_padding_rows_do_not_change_the_others():
    h, w, t = problem(2, 8, 8, 40, torch.float32)
    whole, _ = token_logprobs(h, w, t, chunk_rows=3)
    alone, _ = token_logprobs(h[:1, :5], w, t[:1, :5], chunk_rows=3)
    torch.testing.assert_close(alone, whole[:1, :5])


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_never_exist_forward_or_backward():
    rows, vocab, hidden, chunk = 256, 512, 8, 16
    h, w, t = problem(1, rows, hidden, vocab, torch.float32)
    w.requires_grad_(False)
    with LargestTensor() as seen:
        logp, entropy = token_logprobs(h, w, t, chunk_rows=chunk, backend="torch")
        (logp.sum() + entropy.sum()).backward()
    assert seen.largest <= chunk * vocab < rows * vocab
    with LargestTensor() as seen:
        reference(h, w, t)
    assert seen.largest >= rows * vocab  # the check would notice full logits


@needs_triton
def test_the_triton_path_hands_its_kernels_one_chunk_at_a_time(monkeypatch):
    """The interpreter's own copies hide the kernels' memory on CPU; what matters is the
    size of the logits they are given, which is the chunk's."""
    from vlm_rlaif import kernels

    shapes = []
    for name in ("row_stats", "logit_grads_"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda logits, *args, kernel=kernel: shapes.append(tuple(logits.shape)) or kernel(logits, *args))
    h, w, t = problem(1, 40, 8, 64, torch.float32)
    logp, _ = token_logprobs(h, w, t, chunk_rows=16, backend="triton")
    logp.sum().backward()
    assert shapes == [(16, 64), (16, 64), (8, 64)] * 2


def test_bad_arguments_are_named():
    h, w, t = problem(1, 4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="target ids must lie in"):
        token_logprobs(h, w, t + 20)
    with pytest.raises(ValueError, match="want hidden"):
        token_logprobs(h, w[:, :4], t)
    with pytest.raises(ValueError, match="unknown backend"):
        token_logprobs(h, w, t, backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows"):
        token_logprobs(h, w, t, chunk_rows=0)


def test_a_video_lms_hidden_states_and_head_give_its_own_log_probs(tiny_vlm):
    """What the PPO policy computes (vlm_rlaif.policy) equals the model's logits path."""
    from vlm_rlaif.modeling import build_inputs

    model, processor = tiny_vlm
    video = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "The circle is green."}]
    inputs = build_inputs(processor, [video], [conversation], add_generation_prompt=False)
    ids = inputs["input_ids"]
    with torch.no_grad():
        want = reference_from_logits(model(**inputs).logits[:, :-1], ids[:, 1:])
        hidden = model.model(**inputs).last_hidden_state[:, :-1]
        got = token_logprobs(hidden, model.get_output_embeddings().weight, ids[:, 1:])
    for name, a, b in zip(("logp", "entropy"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def reference_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
