"""Memory of PPO's four models: one frozen base with adapters against four separate models.

PPO needs a policy, a reference, a value model and a reward model. This project keeps one
frozen base with three LoRA adapters (`policy.Models`); the alternative keeps four copies of
the base, three of them with their adapter. Printed:
- weight memory (parameters and buffers) of both arrangements, for the tiny SFT model as
  loaded, and for the paper's 7B shape (LLaVA-NeXT-Video on Vicuna-7B, bf16, LoRA r=64),
  built on the meta device, so nothing is allocated or downloaded;
- peak resident memory of a process that loads each arrangement from the tiny model and runs
  one forward pass through each of the four models, above a process that loads nothing.

Run from the repo root after `dvc repro` (it needs artifacts/sft and artifacts/reward_model):

    python benchmarks/ppo_memory.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from vlm_rlaif import policy, stage
from vlm_rlaif.config import LoraConfig


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n)


def seven_b() -> tuple[int, int]:
    """(base bytes, one LoRA r=64 adapter's bytes) of the paper's 7B shape, on the meta device."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vlm_rlaif.modeling import add_lora

    config = LlavaNextVideoConfig(
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                vocab_size=32064, max_position_embeddings=4096),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
    )
    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(config).to(torch.bfloat16)
    base = weight_bytes(model)
    model = add_lora(model, LoraConfig(r=64, alpha=16))
    return base, adapter_bytes(model, "default")


def peak_rss_kib() -> int:
    """This process's peak resident memory: VmHWM, which exec resets (getrusage's ru_maxrss
    keeps the parent's high-water mark across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def run_arrangement(kind: str) -> None:
    """Load one arrangement from the tiny model ("none": no model), one forward pass through
    each model; print the process's peak RSS (KiB)."""
    from vlm_rlaif.data import read_rl_prompts
    from vlm_rlaif.modeling import add_lora, build_inputs, load_model_and_processor
    from vlm_rlaif.video import load_video

    params = stage.setup()
    if kind != "none":  # "none": the same imports and setup, no model
        prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:8]
        videos = [load_video(p.media(params.data.video_root), params.data.num_frames) for p in prompts]
        if kind == "shared":
            models = policy.load(params)
            processor = models.processor
            passes = [lambda name=name: models.adapter(name) for name in (policy.POLICY, None, policy.VALUE, policy.REWARD)]
            model_of = [models.model] * 4
        else:
            model_of = []
            for name in ("policy", "reference", "value", "reward"):
                model, processor = load_model_and_processor("artifacts/sft")
                if name == "policy":
                    model = add_lora(model, params.ppo.policy_lora)
                elif name in ("value", "reward"):
                    model = PeftModel.from_pretrained(model, "artifacts/reward_model/adapter", is_trainable=name == "value")
                model_of.append(model)
            passes = [contextlib.nullcontext] * 4
        inputs = build_inputs(processor, videos, [[p.conversations[0].to_dict()] for p in prompts], add_generation_prompt=True)
        with torch.no_grad():
            for model, context in zip(model_of, passes):
                with context():
                    model(**inputs)
    print(json.dumps({"kind": kind, "peak_rss_kib": peak_rss_kib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrangement", choices=["none", "shared", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arrangement:
        run_arrangement(args.arrangement)
        return

    params = stage.setup()
    models = policy.load(params)
    base = weight_bytes(models.model.get_base_model()) - sum(adapter_bytes(models.model, n) for n in (policy.POLICY, policy.VALUE, policy.REWARD))
    adapter = adapter_bytes(models.model, policy.POLICY)
    heads = weight_bytes(models.value_head) + weight_bytes(models.reward_model.head)
    shared = weight_bytes(models.model) + heads
    separate = 4 * base + adapter + 2 * adapter_bytes(models.model, policy.VALUE) + heads
    print(f"tiny model (artifacts/sft, {params.base.dtype}): base {base / 2**20:.2f} MiB, policy adapter {adapter / 2**20:.2f} MiB")
    print(f"  weights, one base + 3 adapters: {shared / 2**20:8.2f} MiB")
    print(f"  weights, 4 separate models:     {separate / 2**20:8.2f} MiB")
    b7, a7 = seven_b()
    print(f"7B shape (LLaVA-NeXT-Video-7B, bf16, LoRA r=64): base {b7 / 2**30:.2f} GiB, adapter {a7 / 2**20:.0f} MiB")
    print(f"  weights, one base + 3 adapters: {(b7 + 3 * a7) / 2**30:8.2f} GiB")
    print(f"  weights, 4 separate models:     {(4 * b7 + 3 * a7) / 2**30:8.2f} GiB")
    rss = {}
    for kind in ("none", "shared", "separate"):
        done = subprocess.run([sys.executable, __file__, "--arrangement", kind], capture_output=True, text=True, check=True)
        rss[kind] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kib"]
    print("peak resident memory above a process that loads no model (tiny model, one forward pass through each model):")
    for kind in ("shared", "separate"):
        print(f"  {kind:9s} {(rss[kind] - rss['none']) / 1024:8.1f} MiB")


if __name__ == "__main__":
    main()
