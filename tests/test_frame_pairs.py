"""A tower that reads each frame beside the next sees motion that single frames cannot show."""

import numpy as np
import pytest
import torch

from vlm_rlaif import frame_pairs, pretrain, tiny
from vlm_rlaif.config import TinyModelConfig, VisionPretrainConfig
from vlm_rlaif.modeling import build_inputs, load_model_and_processor
from vlm_rlaif.synthetic.scene import Event, Scene, SceneObject

ANSWERS = {"right": "Left to right.", "left": "Right to left."}
QUESTION = "Which way does the square move?"
SIDE, SIZE, FRAMES = 32, 8, 4


def _scene(motion: str, rng: np.random.Generator) -> Scene:
    y, start = (int(v) for v in rng.integers(SIZE, SIDE - SIZE, 2))
    xs = [start + 3 * t if motion == "right" else start - 3 * t for t in range(FRAMES)]
    xs = [x - min(0, min(xs) - SIZE // 2 - 1) - max(0, max(xs) + SIZE // 2 + 1 - SIDE) for x in xs]
    square = SceneObject("red", "square", motion, SIZE, [215, 40, 40], track=[[x, y] for x in xs])
    return Scene("v", FRAMES, SIDE, 0.0, [30, 30, 30], 0.0, [], 0, [square], [])


def _video(scene: Scene) -> np.ndarray:
    frames = np.full((FRAMES, SIDE, SIDE, 3), 30, np.uint8)
    obj = scene.objects[0]
    for t in range(FRAMES):
        x, y = obj.box(t)
        frames[t, y : y + SIZE, x : x + SIZE] = obj.rgb
    return frames


def _tiny(pairs: bool):
    cfg = TinyModelConfig(
        image_size=SIDE,
        patch_size=8,
        vision_hidden_size=32,
        vision_layers=2,
        text_hidden_size=64,
        text_layers=2,
        intermediate_size=128,
        vocab_size=300,
        frame_pairs=pairs,
    )
    corpus = [QUESTION, *ANSWERS.values()] * 4
    return tiny.build_tiny(cfg, corpus, seed=0, pixel_stats=([0.15] * 3, [0.2] * 3))


def _world(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    motions = [str(m) for m in rng.choice(list(ANSWERS), n)]
    scenes = [_scene(m, rng) for m in motions]
    return (
        [_video(s) for s in scenes],
        [pretrain.cell_targets(s, grid=2, pairs=True) for s in scenes],
        motions,
    )


def _pretrained(pairs: bool):
    model, processor = _tiny(pairs)
    videos, targets, _ = _world(60, seed=1)
    cfg = VisionPretrainConfig(steps=200, batch_size=32, learning_rate=3e-3, heldout=0.25)
    return (
        model,
        processor,
        pretrain.pretrain_vision(model, processor, videos, targets, cfg, seed=0),
    )


def test_each_frame_is_read_beside_the_next():
    frames = torch.arange(3.0).view(1, 3, 1, 1, 1)
    assert frame_pairs.pair_frames(frames).flatten(2).tolist() == [
        [[0.0, 1.0], [1.0, 2.0], [1.0, 2.0]]
    ]
    assert frame_pairs.pair_frames(frames[:, :1]).flatten(2).tolist() == [
        [[0.0, 0.0]]
    ]  # a still image


def _marks(targets: np.ndarray, frame: int) -> set[tuple[str, ...]]:
    names = [*pretrain.ATTRIBUTES, *pretrain.CHANGES, *pretrain.IN_FRAME]
    cells = targets[frame].reshape(-1, len(names))
    return {tuple(names[k] for k in np.flatnonzero(c)) for c in cells if c.any()}


def test_cell_targets_mark_how_each_object_moves_beside_its_colour_and_shape():
    targets = pretrain.cell_targets(_scene("right", np.random.default_rng(0)), grid=2, pairs=True)
    width = len(pretrain.ATTRIBUTES) + len(pretrain.CHANGES) + len(pretrain.IN_FRAME)
    assert targets.shape == (FRAMES, 2, 2, width)
    assert {m for t in range(FRAMES) for m in _marks(targets, t)} == {("red", "square", "right")}


def test_cell_targets_mark_what_happens_between_each_sampled_frame_and_the_next():
    scene = _scene("right", np.random.default_rng(0))
    scene.events = [Event("changes_colour", "square", 2, "blue", [45, 85, 225])]
    targets = pretrain.cell_targets(scene, grid=2, frames=[0, 2, 3], pairs=True)
    changed = ("red", "blue", "square", "right", "changes_colour", "changes_colour in frame")
    quiet = ("changes_colour in frame",)  # every other cell knows it happened in the frame
    split = {changed[:1] + changed[2:], changed[1:]}
    assert _marks(targets, 0) in ({changed, quiet}, split | {quiet})
    assert _marks(targets, 1) == _marks(targets, 2) == {("blue", "square", "right")}
    scene.events = [Event("enters", "square", 1), Event("leaves", "square", 3)]
    targets = pretrain.cell_targets(scene, grid=2, frames=[0, 2, 3], pairs=True)
    entered = ("red", "square", "right", "enters", "enters in frame")  # seen in the pair's second
    assert _marks(targets, 0) == {entered, ("enters in frame",)}
    left = ("red", "square", "right", "leaves", "leaves in frame")
    assert _marks(targets, 1) == {left, ("leaves in frame",)}
    assert _marks(targets, 2) == _marks(targets, 1)  # the last frame is read beside the one before
    assert pretrain.cell_targets(scene, grid=2, frames=[2], pairs=True).sum() == 3  # no next frame


def test_only_a_tower_that_reads_frame_pairs_learns_motion():
    _, _, single = _pretrained(pairs=False)
    _, _, paired = _pretrained(pairs=True)
    assert paired.probe["motion"] >= 0.9 and paired.probe["colour"] >= 0.9
    assert single.probe["motion"] <= 0.75  # a frame alone says nothing of where the square goes


def test_a_frame_pairs_tower_says_in_every_cell_that_something_entered():
    # One token of 128 marking an event is what the language model failed to find.
    rng = np.random.default_rng(5)
    scenes = [_scene(str(m), rng) for m in rng.choice(list(ANSWERS), 60)]
    for scene in scenes[::2]:
        scene.events = [Event("enters", "square", 2)]
    videos = [_video(s) for s in scenes]
    for video, scene in zip(videos, scenes):
        video[: scene.span(scene.objects[0])[0]] = 30  # not there before it enters
    targets = [pretrain.cell_targets(s, grid=2, pairs=True) for s in scenes]
    model, processor = _tiny(pairs=True)
    cfg = VisionPretrainConfig(steps=200, batch_size=32, learning_rate=3e-3, heldout=0.25)
    probe = pretrain.pretrain_vision(model, processor, videos, targets, cfg, seed=0).probe
    assert probe["in_frame_found"] >= 0.8 and probe["in_frame_false"] <= 0.05, probe


def test_the_tiny_base_on_frame_pairs_learns_a_motion_question(tmp_path):
    """The language model learns which way the square moves from a pretrained frame-pairs
    tower's visual tokens, the base saved and loaded by path like every base."""
    model, processor, _ = _pretrained(pairs=True)
    pretrain.centre_projector(model, processor, _world(16, seed=2)[0])
    tiny.save(model, processor, tmp_path / "base")
    model, processor = load_model_and_processor(tmp_path / "base")
    assert model.config.model_type == frame_pairs.MODEL_TYPE
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        part.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    rng = np.random.default_rng(3)

    def loss_on(motions, train):
        videos = [_video(_scene(m, rng)) for m in motions]
        conversations = [
            [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": ANSWERS[m]},
            ]
            for m in motions
        ]
        batch = build_inputs(
            processor, videos, conversations, add_generation_prompt=False, assistant_masks=True
        )
        mask = batch.pop("assistant_masks").bool()
        with torch.set_grad_enabled(train):
            loss = model(**batch, labels=batch["input_ids"].masked_fill(~mask, -100)).loss
        return loss, mask.sum().item() / len(motions)

    for _ in range(150):
        loss, _ = loss_on([str(m) for m in rng.choice(list(ANSWERS), 8)], train=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    heldout, tokens = loss_on(["right", "left"] * 8, train=False)
    blind = np.log(2) / tokens  # a model blind to the motion pays ln 2 on each answer's first word
    assert heldout.item() < 0.5 * blind, (heldout.item(), blind)


@pytest.mark.parametrize("pairs", [False, True])
def test_the_tiny_config_says_which_tower_it_builds(pairs):
    model, _ = _tiny(pairs)
    assert model.config.vision_config.num_channels == (6 if pairs else 3)
    assert (model.config.model_type == frame_pairs.MODEL_TYPE) == pairs
