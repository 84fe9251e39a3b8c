"""The one generation path: batching, sampling, EOS handling and encode-once, on a real tiny VLM."""

import numpy as np
import pytest
import torch

from vlm_rlaif.data import RLPrompt
from vlm_rlaif.generation import GenerationError, distinct_media, encode_videos, generate, generate_sequences, with_features
from vlm_rlaif.modeling import build_inputs

FRAMES = 4
QUESTIONS = ["What moves?", "Describe the video in detail, from the first frame to the last.", "How many objects are in the video?"]


def prompts(n: int = 3) -> tuple[list[np.ndarray], list[list[dict]]]:
    videos = [np.random.default_rng(i).integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8) for i in range(n)]
    return videos, [[{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"}] for i in range(n)]


def ids(generations) -> list[list[list[int]]]:
    return [[g.token_ids.tolist() for g in group] for group in generations]


@pytest.fixture
def frames_seen(tiny_vlm):
    """Frames through the vision tower, one entry per call."""
    seen: list[int] = []
    hook = tiny_vlm[0].model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    yield seen
    hook.remove()


def test_greedy_batch_equals_one_prompt_at_a_time(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(3)
    one = [generate_sequences(model, processor, [v], [c], max_new_tokens=8)[0] for v, c in zip(videos, conversations)]
    for batch_size in (2, 3):
        batched = generate_sequences(model, processor, videos, conversations, max_new_tokens=8, batch_size=batch_size)
        assert ids(batched) == ids(one)
        assert [g[0].text for g in batched] == [g[0].text for g in one]
    assert len({tuple(g[0].token_ids.tolist()) for g in one}) == 3  # the prompts really differ
    texts = generate(model, processor, videos, conversations, max_new_tokens=8, batch_size=2)
    assert texts == [[group[0].text] for group in one]


def test_sampling_is_reproducible_under_a_seed_and_returns_n_per_prompt(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(2)

    def sample(seed: int):
        torch.manual_seed(seed)
        return generate_sequences(
            model, processor, videos, conversations, max_new_tokens=6, temperature=1.0, num_return_sequences=3, batch_size=1
        )

    first, again, other = sample(0), sample(0), sample(1)
    assert [len(group) for group in first] == [3, 3]
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert len({tuple(g.token_ids.tolist()) for g in first[0]}) > 1  # the copies are separate samples
    with pytest.raises(GenerationError, match="num_return_sequences=2 with temperature 0"):
        generate(model, processor, videos, conversations, max_new_tokens=4, num_return_sequences=2)


def test_max_new_tokens_and_eos_flag(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm
    videos, conversations = prompts(2)
    plain = generate_sequences(model, processor, videos, conversations, max_new_tokens=6)
    for group in plain:
        assert len(group[0].token_ids) == 6 and not group[0].ended
    first, second = plain[0][0].token_ids.tolist(), plain[1][0].token_ids.tolist()
    stop = next(t for t in first[1:] if t not in second and t != first[0])  # ends row 0 early, never row 1
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop)
    ended = generate_sequences(model, processor, videos, conversations, max_new_tokens=6)
    cut = first.index(stop) + 1
    row0, row1 = ended[0][0], ended[1][0]
    assert row0.ended and row0.token_ids.tolist() == first[:cut]  # EOS kept, padding after it dropped
    assert not row1.ended and row1.token_ids.tolist() == second
    assert row0.text == processor.tokenizer.decode(first[:cut], skip_special_tokens=True).strip()
    assert not row0.token_ids.is_inference()  # PPO feeds the ids to a forward pass it backpropagates


def test_encode_once_matches_the_plain_path_and_skips_the_vision_tower(tiny_vlm, frames_seen):
    model, processor = tiny_vlm
    videos, conversations = prompts(3)
    frames = frames_seen
    torch.manual_seed(0)
    plain = generate_sequences(model, processor, videos, conversations, max_new_tokens=5, temperature=1.0, num_return_sequences=3, batch_size=2)
    assert sum(frames) == 3 * FRAMES  # each video once, although each has 3 samples

    inputs = build_inputs(processor, videos, conversations, add_generation_prompt=True)
    features = encode_videos(model, inputs)
    assert [f.shape[0] for f in features] == [FRAMES * 4] * 3  # (32/8)^2 patches pooled 2x2 per frame
    frames.clear()
    torch.manual_seed(0)
    reused = generate_sequences(
        model, processor, videos, conversations, max_new_tokens=5, temperature=1.0, num_return_sequences=3, batch_size=2, features=features
    )
    greedy_reused = generate(model, processor, videos, conversations, max_new_tokens=5, features=features)
    with torch.no_grad():
        logits = model(**with_features(inputs, features)).logits
        assert frames == []
        expected = model(**inputs).logits
    assert ids(reused) == ids(plain)
    assert greedy_reused == generate(model, processor, videos, conversations, max_new_tokens=5)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(GenerationError, match="2 video features for 3 prompts"):
        with_features(inputs, features[:2])


def test_generation_leaves_the_model_in_its_mode(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(1)
    model.train()
    try:
        generate(model, processor, videos, conversations, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(GenerationError, match="2 videos for 1 conversations"):
        generate(model, processor, videos * 2, conversations, max_new_tokens=2)


def test_distinct_media_names_each_video_once_and_maps_every_prompt_to_it():
    def asked(uid: int, images: list[str] | None = None, video: str | None = None) -> RLPrompt:
        turns = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]
        media = {"images": images} if images else {"video": video}
        return RLPrompt.from_dict({"conversations": turns, "uid": uid, **media}, "test")

    prompts = [asked(0, ["v1/0.png", "v1/1.png"]), asked(1, video="clip.mp4"), asked(2, ["v1/0.png", "v1/1.png"]),
               asked(3, ["v2/0.png"]), asked(4, video="clip.mp4")]
    media, video_of = distinct_media(prompts, "root")
    assert video_of == [0, 1, 0, 2, 1]
    assert media == [prompts[0].media("root"), prompts[1].media("root"), prompts[3].media("root")]


def test_media_placeholders_are_never_generated(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(2)
    media = [processor.tokenizer.convert_tokens_to_ids(t) for t in (processor.video_token, processor.image_token)]
    boost = torch.zeros(model.get_output_embeddings().out_features)
    boost[media] = 100.0  # the model now wants the placeholders above every other token
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)
    try:
        logits = model(**build_inputs(processor, videos[:1], conversations[:1], add_generation_prompt=True)).logits[0, -1]
        assert logits.argmax().item() in media
        for temperature in (0.0, 1.0):
            torch.manual_seed(0)
            out = generate_sequences(model, processor, videos, conversations, max_new_tokens=6, temperature=temperature)
            tokens = {t for group in ids(out) for row in group for t in row}
            assert tokens and not tokens & set(media)
    finally:
        hook.remove()
