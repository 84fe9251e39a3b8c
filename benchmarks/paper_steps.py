"""An SFT step, a reward-model step and a PPO iteration at the paper's 7B shape, through the
stages' own code, with the time and peak memory of each.

The model has LLaVA-NeXT-Video-7B's architecture (CLIP ViT-L/14 at 336 px read at layer -2,
2x2 pooling to 144 tokens a frame, Vicuna-7B: 4096 wide, 32 layers, vocabulary 32064) and
random weights, built on the device by the embedded default's recipe (`vlm_rlaif.tiny`), so
nothing is downloaded. The data are a small synthetic world in the release's layout. The
settings are params/paper.yaml's at one GPU's share: SFT with LoRA r=32, the projector and
gradient checkpointing on 4 conversations; the reward model (LoRA r=64 on the SFT model) on 2
pairs; PPO (LoRA r=64) on a rollout of 32 prompts with 896-token responses (a random model
never stops early: the longest rollout there is), two epochs of minibatches of 16. Each stage
call includes loading its models; the load alone is timed too.

The PPO iteration runs as `ppo.train` runs one, its rollout and its updates timed apart:
rollout tokens/s counts the generated tokens, train tokens/s every token of the sequences
the updates pass through (video, question, answer), and MFU is the model FLOPs of both over
the GPU's dense bf16 peak: 2N a token for each forward pass (the rollout's prefill and
decode, then its four scoring passes: policy, reference, value, reward) and 4N a token for
each update pass (forward, and backward through the activations of a frozen base), two per
minibatch (policy and value), N the language model's parameters with its head.

    python benchmarks/paper_steps.py                      # 7B shape on the GPU (~5 min on an H100)
    python benchmarks/paper_steps.py --shape tiny         # the same path at toy width (CPU, ~1 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator

from vlm_rlaif import policy, ppo, prepare, reward_model, rollout, sft, tiny
from vlm_rlaif.config import Params, TinyModelConfig, load_params
from vlm_rlaif.data import read_rl_prompts, write_records
from vlm_rlaif.modeling import build_inputs, load_model_and_processor
from vlm_rlaif.preferences import preference_record
from vlm_rlaif.synthetic.world import generate_world

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": TinyModelConfig(image_size=336, patch_size=14, vision_hidden_size=1024, vision_layers=24, vision_heads=16,
                          vision_feature_layer=-2, text_hidden_size=4096, text_layers=32, text_heads=32, intermediate_size=11008,
                          vocab_size=32064, max_position_embeddings=4096),
    "tiny": TinyModelConfig(image_size=56, patch_size=14, vision_hidden_size=32, vision_layers=2, vision_heads=2,
                            vision_feature_layer=-2, text_hidden_size=64, text_layers=2, text_heads=2, intermediate_size=128,
                            vocab_size=512, max_position_embeddings=4096),
}
WORLD = {"seed": 0, "num_sft_videos": 2, "num_rl_videos": 16, "num_eval_videos": 2, "num_frames": 16, "frame_size": 64,
         "judge_examples_per_video": 0, "questions_per_video": 2, "eval_questions_per_video": 2}
ONE_GPU = {  # params/paper.yaml's per-GPU sizes, one step or one iteration each
    "sft": {"batch_size": 4, "grad_accum": 1, "num_processes": 1, "epochs": 1.0, "save_steps": 1000},
    "reward_model": {"base": None, "preferences": "released", "batch_size": 2, "epochs": 1.0, "heldout": 1, "num_processes": 1,
                     "save_steps": 1000},
    "ppo": {"policy_init": False, "num_prompts": 32, "rollout_batch_size": 32, "step_batch_size": 16, "num_processes": 1,
            "save_steps": 1000, "seeds": [0]},
}


def profile(model: Path) -> dict:
    """params/paper.yaml on the synthetic world in the release layout, the built model as base."""
    params = yaml.safe_load((ROOT / "params/paper.yaml").read_text())
    params["world"] = WORLD
    params["data"] |= {"eval_video_root": "data/videos/synthetic_16frames", "zeroshot_qa_files": {"synthetic": "eval/zeroshot_qa.json"},
                       "on_bad_record": "stop", "curriculum": {"threshold_words": 10, "quantile": None}}
    params["base"] |= {"model": str(model)}
    for section, sizes in ONE_GPU.items():
        params[section] |= sizes
    return params


def release_files(data: Path, params: dict) -> None:
    """The release's policy-init and reward-model files, from the world's SFT and RL records."""
    shutil.copy(data / "SFT_short.json", data / params["data"]["policy_init_file"])
    pairs = []
    for prompt in json.loads((data / "RL_data.json").read_text()):
        pairs.append(preference_record(prompt | {"output_1": {"value": prompt["conversations"][1]["value"]},
                                                 "output_2": {"value": "Nothing happens."}, "preference": 1}))
    write_records(data / params["data"]["preference_file"], pairs[:3])  # one held out, one step of two


def build_model(shape: TinyModelConfig, corpus: list[str], out: Path, device: torch.device) -> None:
    """Random weights of `shape` in bfloat16, initialised on `device`, saved as a model folder."""
    with torch.device(device):
        model, processor = tiny.build_tiny(shape, corpus, seed=0)
    model.resize_token_embeddings(shape.vocab_size, mean_resizing=False)  # the tokenizer learnt fewer tokens than the vocabulary
    tiny.save(model.to(torch.bfloat16), processor, out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def ppo_iteration(params: Params, device: torch.device) -> dict:
    """One rollout and its PPO epochs, as `ppo.train` runs them; tokens per second and MFU."""
    cfg = params.ppo
    accelerator = Accelerator(cpu=device.type == "cpu")
    models = policy.load(params).to(accelerator.device)
    prompts = read_rl_prompts(Path("artifacts/prepare/rl_prompts.json")).records[: cfg.rollout_batch_size]
    optimizer = torch.optim.AdamW(models.trainable_parameters(), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    start = time.perf_counter()
    batch = rollout.collect(models, prompts, cfg, kl_coef=cfg.kl_coef, video_root=params.data.video_root,
                            num_frames=params.data.num_frames, batch_size=cfg.step_batch_size)
    sync()
    rolled = time.perf_counter()
    for _ in range(cfg.ppo_epochs):
        for index in np.array_split(torch.randperm(len(batch)).numpy(), len(batch) // cfg.step_batch_size):
            ppo.minibatch_step(models, batch.rows(index), cfg, accelerator, optimizer, scheduler)
    sync()
    trained = time.perf_counter()

    prompt_tokens = int(build_inputs(models.processor, batch.videos, batch.prompts, add_generation_prompt=True)["attention_mask"].sum())
    generated = int(batch.mask.sum())
    sequences = prompt_tokens + generated
    base = models.model.get_base_model()
    n = sum(p.numel() for p in base.model.language_model.parameters()) + base.lm_head.weight.numel()
    flops = 2 * n * sequences + 4 * 2 * n * sequences + cfg.ppo_epochs * 2 * 4 * n * sequences
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    seconds = trained - start
    return {"rollout_s": round(rolled - start, 1), "train_s": round(trained - rolled, 1),
            "rollout_tokens_per_s": round(generated / (rolled - start), 1),
            "train_tokens_per_s": round(cfg.ppo_epochs * sequences / (trained - rolled), 1),
            "mean_response_tokens": round(generated / len(batch), 1), "language_model_parameters": n,
            "mfu": None if peak is None else round(flops / seconds / peak, 3)}


def measured(name: str, device: torch.device, fn) -> dict:
    """Wall time and peak memory of `fn()`: allocated on the GPU, or the process's resident peak on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"phase": name, "seconds": round(seconds, 1), "peak_GiB": round(peak / 2**30, 2)}
    print(f"{name:<34} {row['seconds']:>8.1f} s {row['peak_GiB']:>8.2f} GiB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlm_rlaif_paper_steps"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = copy.deepcopy(SHAPES[args.shape])
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "artifacts").mkdir(parents=True)
    os.chdir(args.work)
    shutil.copy(ROOT / "dvc.yaml", "dvc.yaml")
    shutil.copytree(ROOT / "configs", "configs")

    model_dir = args.work / "artifacts/base"
    settings = profile(model_dir)
    Path("params.yaml").write_text(yaml.safe_dump(settings))
    params = load_params("params.yaml")
    generate_world(params.world, Path("data"))
    release_files(Path("data"), settings)
    prepare.run(params)
    corpus = [t for r in json.loads(Path("data/SFT_long.json").read_text()) for t in (c["value"] for c in r["conversations"])]

    print(f"{args.shape} shape on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"{params.data.num_frames} frames, bf16, torch {torch.__version__}")
    rows = [measured("build random weights", device, lambda: build_model(shape, corpus, model_dir, device))]
    rows.append(measured("load the base (bf16)", device, lambda: load_model_and_processor(model_dir, dtype="bfloat16")))
    Path("artifacts/sft").symlink_to(model_dir, target_is_directory=True)  # the SFT model is the base here: same shape
    rows.append(measured("SFT (LoRA r=32, 4 a step)", device, lambda: sft.train(params, out=Path("sft_out"))))
    rows[-1]["steps"] = json.loads(Path("sft_out/curriculum.json").read_text())["total_steps"]
    rows.append(measured("RM (LoRA r=64, 2 pairs a step)", device, lambda: reward_model.train(params)))
    rows[-1]["steps"] = json.loads((reward_model.OUT / "split.json").read_text())["total_steps"]
    iteration = {}
    rows.append(measured("PPO (LoRA r=64, rollout of 32)", device, lambda: iteration.update(ppo_iteration(params, device))))
    rows[-1] |= iteration
    print("  " + ", ".join(f"{k} {v}" for k, v in iteration.items()))
    print(json.dumps({"shape": args.shape, "device": str(device), "rows": rows}))


if __name__ == "__main__":
    main()
