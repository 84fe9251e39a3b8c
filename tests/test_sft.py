"""Curriculum SFT: ordering, the loss mask, resume after a kill, LoRA, two processes."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from vlm_rlaif import data, sft, tiny
from vlm_rlaif.collate import IGNORE_INDEX, VideoConversationCollator, turn_attention
from vlm_rlaif.config import ConfigError, LoraConfig, SFTConfig, TinyModelConfig, load_params
from vlm_rlaif.data import SFTRecord, Turn, read_sft
from vlm_rlaif.modeling import add_lora, load_model_and_processor, visual_token_ids

from conftest import PARAMS, resumed_step


def _record(i: int, answer: str) -> SFTRecord:
    return SFTRecord(id=i, conversations=[Turn("human", "<image>\nq"), Turn("gpt", answer)], images=["f.png"])


def test_curriculum_puts_every_easy_example_before_the_hard_stage():
    easy = [_record(i, "short") for i in range(10)]
    hard = [_record(100 + i, "a long answer " * 5) for i in range(6)]
    captions = [_record(200 + i, "caption") for i in range(50)]
    judge = [_record(300 + i, "A") for i in range(50)]
    cfg = SFTConfig(epochs=2.0, caption_share=0.25, judge_share=0.5)
    c = sft.build_curriculum(easy, hard, captions, judge, cfg, seed=0)
    # shares of the hard stage: 6 hard examples are the remaining quarter of it
    assert c.sizes == {"easy": 10, "hard": 6, "captions": 6, "judge": 12, "context": 0, "replay": 0}
    assert c.boundary == 20 and len(c.records) == 20 + 2 * (6 + 6 + 12)
    assert {r.id for r in c.records[: c.boundary]} == set(range(10))
    assert all(r.id >= 100 for r in c.records[c.boundary :])
    assert [r.id for r in c.records[:10]] != [r.id for r in c.records[10:20]]  # each epoch reshuffled
    again = sft.build_curriculum(easy, hard, captions, judge, cfg, seed=0)
    assert [r.id for r in again.records] == [r.id for r in c.records]

    mixed = sft.build_curriculum(easy, hard, captions, judge, SFTConfig(curriculum=False, epochs=1.5, batch_size=1), seed=0)
    assert mixed.boundary is None and len(mixed.records) == 15 + 9
    ids = [r.id for r in mixed.records]
    assert min(i for i, x in enumerate(ids) if x >= 100) < max(i for i, x in enumerate(ids) if x < 100)  # not easy, then hard


def test_hard_examples_are_asked_again_with_their_clip_captions_and_the_easy_order_stays():
    def frames(video: str, first: int) -> list[str]:
        return [f"{video}/frame_{first + i:03d}.png" for i in range(2)]

    easy = [_record(i, "short") for i in range(10)]
    hard = [dataclasses.replace(_record(100 + i, "A red circle moves."), images=frames(f"v{i}", 0))
            for i in range(4)]
    captions = [dataclasses.replace(_record(200 + 3 * i + k, f"clip {k} of v{i}"), images=frames(f"v{i}", 2 * k))
                for i in range(3) for k in (2, 0, 1)]  # video v3 has none
    asked = sft.with_clip_captions(hard, captions)
    assert [r.id for r in asked] == ["100_context", "101_context", "102_context"]
    question = asked[1].conversations[0].value
    assert question.startswith("<image>\n") and question.count("<image>") == 1 and question.endswith("\nq")
    assert question.index("clip 0 of v1") < question.index("clip 1 of v1") < question.index("clip 2 of v1")
    assert asked[1].conversations[1].value == "A red circle moves." and asked[1].images == hard[1].images
    # a description that says more than its clip captions is answered, after them, as they support
    hard[2] = dataclasses.replace(hard[2], extra={data.GROUNDED: "A red circle."})
    grounded = sft.with_clip_captions(hard, captions)
    assert grounded[2].conversations[1].value == "A red circle."
    assert hard[2].conversations[1].value == "A red circle moves."
    assert [r.conversations[1].value for r in grounded[:2]] == ["A red circle moves."] * 2
    plain = sft.build_curriculum(easy, hard, captions, [], SFTConfig(easy_epochs=3.0), seed=0)
    cfg = SFTConfig(easy_epochs=3.0, context_share=0.5)
    with_context = sft.build_curriculum(easy, hard, captions, [], cfg, seed=0)
    assert with_context.sizes["context"] == 2 and with_context.boundary == plain.boundary
    assert [r.id for r in with_context.records[: plain.boundary]] == [r.id for r in plain.records[: plain.boundary]]
    assert sum(str(r.id).endswith("_context") for r in with_context.records[plain.boundary :]) == 2


def test_each_curriculum_stage_warms_up_and_decays_on_its_own():
    cosine = sft.stage_schedule("cosine", 0.1, total_steps=30, boundary_step=10)
    first, second = [cosine(t) for t in range(10)], [cosine(t) for t in range(10, 30)]
    assert first[0] == pytest.approx(0.5) and first[1] == 1.0 and first[-1] < 0.05  # 1 warmup step, then down
    assert second[:2] == pytest.approx([1 / 3, 2 / 3]) and second[2] == 1.0 and second[-1] < 0.01  # again, from the top
    assert all(a >= b for a, b in zip(second[2:], second[3:]))
    single = sft.stage_schedule("linear", 0.0, total_steps=4, boundary_step=None)
    assert [single(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]  # as transformers' linear schedule
    assert sft.stage_schedule("constant", 0.0, 8, 4)(6) == 1.0


def test_easy_epochs_repeat_the_easy_split_only_in_either_order():
    easy = [_record(i, "short") for i in range(10)]
    hard = [_record(100 + i, "a long answer " * 5) for i in range(6)]
    cfg = SFTConfig(epochs=1.0, easy_epochs=3.0)
    c = sft.build_curriculum(easy, hard, [], [], cfg, seed=0)
    assert c.boundary == 30 and len(c.records) == 36
    assert Counter(r.id for r in c.records[:30]) == {i: 3 for i in range(10)}
    mixed = sft.build_curriculum(easy, hard, [], [], SFTConfig(curriculum=False, epochs=1.0, easy_epochs=3.0), seed=0)
    assert Counter(r.id for r in mixed.records) == Counter(r.id for r in c.records)


def test_hard_stage_replays_easy_examples_and_batches_group_by_length():
    easy = [_record(i, "short") for i in range(40)]
    hard = [_record(100 + i, "a long answer " * 5) for i in range(30)]
    judge = [_record(300 + i, "A " * (200 + 200 * (i % 2))) for i in range(50)]
    cfg = SFTConfig(epochs=1.0, batch_size=4, judge_share=0.375, replay_share=0.25)
    c = sft.build_curriculum(easy, hard, [], judge, cfg, seed=0)
    assert c.sizes["judge"] == 18 and c.sizes["replay"] == 16  # 0.25 of a hard stage of 48 + replay
    second = c.records[c.boundary :]
    assert len(second) == 30 + 18 + 16 and sum(r.id < 100 for r in second) == 16
    buckets = [sft._length_bucket(r) for r in second]
    assert sorted(set(buckets)) == [0, 1, 3]  # QA and descriptions, short judge examples, long ones
    batches = [buckets[i : i + 4] for i in range(0, len(buckets), 4)]
    assert sum(len(set(b)) > 1 for b in batches) <= 3  # at most the one batch where a bucket ends, per bucket


def test_packing_makes_one_conversation_per_video_with_one_placeholder():
    def ask(i: int, video: str, question: str, answer: str) -> SFTRecord:
        return SFTRecord(id=i, conversations=[Turn("human", f"<image>\n{question}"), Turn("gpt", answer)], images=[video])

    records = [ask(0, "a.png", "What colour?", "Red."), ask(1, "b.png", "Moves?", "No."), ask(2, "a.png", "What shape?", "A cross.")]
    packed = sft.pack_turns(records)
    assert [r.images for r in packed] == [["a.png"], ["b.png"]]
    assert [(t.speaker, t.value) for t in packed[0].conversations] == [
        ("human", "<image>\nWhat colour?"), ("gpt", "Red."), ("human", "What shape?"), ("gpt", "A cross.")
    ]
    c = sft.build_curriculum(records, [], [], [], SFTConfig(pack_turns=True), seed=0)
    assert c.sizes["easy"] == 2 and c.boundary == 2


def test_collator_puts_the_loss_on_the_answer_only(built):
    _, processor = load_model_and_processor(built / "artifacts/base")
    record = read_sft(built / "artifacts/prepare/sft_easy.json").records[0]
    collate = VideoConversationCollator(processor, built / "data/videos", num_frames=4, max_length=512)
    batch = collate([record, read_sft(built / "artifacts/prepare/sft_hard.json").records[0]])
    labels = batch["labels"][0]
    answer = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert answer.strip() == record.answer() + processor.tokenizer.eos_token
    assert batch["labels"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match="max_length 10 cuts into the 16 visual tokens"):
        VideoConversationCollator(processor, built / "data/videos", num_frames=4, max_length=10)([record])


def test_packed_turns_see_the_video_and_not_each_others_answers(built):
    model, processor = load_model_and_processor(built / "artifacts/base")
    easy = read_sft(built / "artifacts/prepare/sft_easy.json").records
    first, second = [r for r in easy if r.video == easy[0].video][:2]  # two questions, one video
    other = dataclasses.replace(
        first, conversations=[first.conversations[0], Turn("gpt", "Something else entirely.")]
    )

    def answer_logits(records: list[SFTRecord], turn: int, independent: bool) -> torch.Tensor:
        collate = VideoConversationCollator(
            processor, built / "data/videos", 4, 512, independent_turns=independent
        )
        batch = collate(sft.pack_turns(records))
        replies = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten()
        runs = torch.tensor_split(replies, (replies.diff() > 1).nonzero().flatten() + 1)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        return logits[runs[turn] - 1]

    alone = answer_logits([first], turn=0, independent=False)
    assert torch.allclose(answer_logits([first, second], 0, independent=True), alone, atol=1e-5)
    for independent in (True, False):  # the second answer reads the first one unless independent
        later = [answer_logits([f, second], 1, independent) for f in (first, other)]
        assert torch.allclose(*later, atol=1e-5) == independent


@pytest.mark.parametrize("placeholder", ["video_token", "image_token"])
def test_packed_turns_see_an_image_as_they_see_a_video(placeholder):
    processor = tiny.build_processor(TinyModelConfig(vocab_size=300), ["What colour?", "Red."])
    visual = processor.tokenizer.convert_tokens_to_ids(getattr(processor, placeholder))
    text = processor.tokenizer.bos_token_id
    # BOS, two visual tokens, question 1, answer 1, question 2, answer 2, padding
    ids = torch.tensor([[text, visual, visual, text, text, text, text, text]])
    replies = torch.tensor([[0, 0, 0, 0, 1, 0, 1, 0]]).bool()
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]).bool()
    mask, positions = turn_attention(torch.isin(ids, torch.tensor(visual_token_ids(processor))), replies, valid)
    second_answer = mask[0, 0, 6]
    assert second_answer[:3].all() and not second_answer[3:5].any()
    assert positions[0, 5:7].tolist() == positions[0, 3:5].tolist() == [3, 4]


@pytest.mark.parametrize("lora", [False, True])
def test_the_fused_loss_equals_the_models_own_loss_and_gradients(built, tmp_path, lora):
    model, processor = load_model_and_processor(built / "artifacts/base")
    if lora:
        model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    records = [read_sft(built / f"artifacts/prepare/sft_{split}.json").records[0] for split in ("easy", "hard")]
    batch = VideoConversationCollator(processor, built / "data/videos", num_frames=4, max_length=512)(records)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, average_tokens_across_devices=False)
    trainer = sft.CheckpointTrainer(model=model, args=args, schedule=lambda step: 1.0)
    fused_calls = []
    real = sft.logprobs.labelled_logprob_sum
    sft.logprobs.labelled_logprob_sum = lambda *a, **k: fused_calls.append(1) or real(*a, **k)
    try:
        for items in (None, torch.tensor(50)):  # a per-batch mean, and a sum over the accumulated batch's 50 tokens
            losses, grads = [], []
            for compute in (trainer.compute_loss, lambda *a, **k: Trainer.compute_loss(trainer, *a, **k)):
                model.zero_grad()
                loss = compute(model, dict(batch), num_items_in_batch=items)
                loss.backward()
                losses.append(loss.detach())
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
            assert grads[0].keys() == grads[1].keys() and grads[0]
            assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6) for n in grads[0])
    finally:
        sft.logprobs.labelled_logprob_sum = real
    assert len(fused_calls) == 2


def test_a_frozen_towers_features_are_computed_once_per_video_and_change_nothing(built, tmp_path):
    model, processor = load_model_and_processor(built / "artifacts/base")
    sft.set_trainable(model, SFTConfig(train_projector=False), "llava_next_video")
    assert sft.video_side_frozen(model, "llava_next_video")
    records = read_sft(built / "artifacts/prepare/sft_easy.json").records[:3]
    collate = VideoConversationCollator(processor, built / "data/videos", num_frames=4,
                                        max_length=512, video_keys=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = sft.CheckpointTrainer(model=model, args=args, schedule=lambda step: 1.0)
    encoded = []
    real = model.model.get_video_features  # what the forward pass and `encode_videos` both call

    def counted(*args, **kwargs):
        encoded.append(1)
        return real(*args, **kwargs)

    model.model.get_video_features = counted
    batch = collate(records)
    plain = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "video_keys"})
    assert len(encoded) == 1
    for _ in range(2):  # the first pass encodes and keeps, the second reads what was kept
        assert torch.equal(trainer.compute_loss(model, dict(collate(records))), plain)
    assert len(encoded) == 2 and len(trainer.features) == len(set(collate(records)["video_keys"]))
    sft.set_trainable(model, SFTConfig(train_projector=True), "llava_next_video")
    assert not sft.video_side_frozen(model, "llava_next_video")


def test_a_head_an_engine_shards_or_with_a_bias_takes_the_models_own_loss():
    head = torch.nn.Linear(8, 32, bias=False)
    owner = type("Owner", (), {"get_output_embeddings": lambda self: head})()
    assert sft.full_head_weight(owner) is head.weight
    head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the forward pass
    assert sft.full_head_weight(owner) is None
    head.weight, head.bias = torch.nn.Parameter(torch.zeros(32, 8)), torch.nn.Parameter(torch.zeros(32))
    assert sft.full_head_weight(owner) is None


def _params_file(root: Path, **sft_overrides) -> Path:
    params = {**PARAMS, "sft": {**PARAMS["sft"], **sft_overrides}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_checkpoint_of_another_run_is_discarded_not_resumed(built, monkeypatch, capsys, tmp_path):
    """Kills at every point of a run are tests/test_faults.py's; here the run stamp."""
    monkeypatch.chdir(built)
    params = load_params(_params_file(built))
    out, checkpoints = tmp_path / "sft", tmp_path / "checkpoints"
    sft.train(params, out=out, checkpoints=checkpoints)
    first = load_file(out / "model.safetensors")
    steps = json.loads((out / "curriculum.json").read_text())["total_steps"]
    capsys.readouterr()
    sft.train(params, out=out, checkpoints=checkpoints)
    assert resumed_step(capsys.readouterr().err) == steps  # the same run: resumed from its last checkpoint

    (checkpoints / "run.json").write_text('{"fingerprint": "another run"}')
    sft.train(params, out=out, checkpoints=checkpoints)
    assert resumed_step(capsys.readouterr().err) is None
    assert json.loads((out / "curriculum.json").read_text())["total_steps"] == steps
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, first[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lora_trains_adapters_and_saves_a_merged_model(built, monkeypatch):
    monkeypatch.chdir(built)
    params = load_params(_params_file(built, lora={"r": 4, "alpha": 8, "dropout": 0.0}, epochs=0.3))
    model, _ = load_model_and_processor(built / "artifacts/base")
    peft_model = add_lora(model, params.sft.lora, [sft.PROJECTORS[params.base.family]] if params.sft.train_projector else None)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)

    out = sft.train(params, out=built / "lora_out", checkpoints=built / "lora_ckpt")
    merged, _ = load_model_and_processor(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base_weights = load_file(built / "artifacts/base/model.safetensors")
    merged_weights = load_file(out / "model.safetensors")
    changed = [n for n in merged_weights if "q_proj" in n and "language_model" in n and not torch.equal(merged_weights[n], base_weights[n])]
    assert changed  # the adapters were trained and merged into the language model
    assert all(torch.equal(merged_weights[n], base_weights[n]) for n in merged_weights if "vision_tower" in n)


def test_qlora_trains_on_a_4bit_base_and_saves_full_precision_weights(built, monkeypatch):
    monkeypatch.chdir(built)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    four_bit = {**PARAMS["base"], "load_in_4bit": True}
    with pytest.raises(ConfigError, match=r"sft\.lora: a 4-bit base"):
        sft.train(load_params(_params_file(built, epochs=0.3), overrides={"base": four_bit}), out=built / "q_out", checkpoints=built / "q_ckpt")
    params = load_params(_params_file(built, lora=lora, epochs=0.3, gradient_checkpointing=True), overrides={"base": four_bit})
    out = sft.train(params, out=built / "q_out", checkpoints=built / "q_ckpt")
    base_weights = load_file(built / "artifacts/base/model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base_weights.keys()  # no quantisation state: any stage loads it in base.dtype
    assert all(merged[n].dtype == base_weights[n].dtype for n in merged)
    updates = {n: merged[n] - base_weights[n] for n in merged if "language_model" in n and n.endswith("q_proj.weight")}
    # each a rank-4 update of the full-precision weight: merged into nf4-rounded weights it would be full rank
    assert updates and all(u.abs().max() > 0 and torch.linalg.matrix_rank(u) <= lora["r"] for u in updates.values())


def test_two_processes_train_one_model(built, monkeypatch, cpu_processes):
    """The notebook's path: `run` starts two CPU processes under the DDP engine's config."""
    monkeypatch.chdir(built)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = load_params(_params_file(built, epochs=0.5, num_processes=2))
    out = sft.run(params)
    info = json.loads((out / "curriculum.json").read_text())
    assert info["total_steps"] == -(-info["examples"] // (PARAMS["sft"]["batch_size"] * 2))
    load_model_and_processor(out)


def test_a_converted_release_trains_as_a_base(built, monkeypatch, tmp_path):
    """A released checkpoint after `vlm_rlaif.convert` is tuned like any base: LoRA on its
    language model, its vision tower untouched, saved merged as the same architecture."""
    from test_convert import clip_folder, original_checkpoint
    from vlm_rlaif.convert import convert

    monkeypatch.chdir(built)
    original_checkpoint(tmp_path / "checkpoint")
    clip_folder(tmp_path / "clip")
    release = convert(tmp_path / "checkpoint", tmp_path / "release", tmp_path / "clip")
    params = load_params(_params_file(built, lora={"r": 4, "alpha": 8, "dropout": 0.0}, epochs=0.1))
    out = sft.train(params, base=release, out=tmp_path / "sft", checkpoints=tmp_path / "ckpt")
    model, _ = load_model_and_processor(out)
    assert type(model).__name__ == "VideoChatGPTLlavaForConditionalGeneration"
    before, after = load_file(release / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(after[n], before[n]) for n in before if "language_model" in n and n.endswith("q_proj.weight"))
    assert all(torch.equal(after[n], before[n]) for n in before if "vision_tower" in n)
