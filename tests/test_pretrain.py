"""The tiny base's vision pretraining: exact cell targets, a tower that learns, a centred projector."""

import json

import numpy as np
import pytest
import torch

from vlm_rlaif import base, pretrain, prepare, sft
from vlm_rlaif.config import VisionPretrainConfig, load_params
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.synthetic.scene import COLOURS, Event, Scene, SceneObject

RED, BLUE, SQUARE = list(COLOURS).index("red"), list(COLOURS).index("blue"), len(COLOURS) + 1


def _scene() -> Scene:
    square = SceneObject("red", "square", "right", 6, [215, 40, 40], track=[[5, 5], [9, 5], [13, 20], [17, 20]])
    return Scene("v", 4, 32, 0.0, [0, 0, 0], 0.0, [], 0, [square], [Event("changes_colour", "square", 2, "blue", [45, 85, 225])])


def test_cell_targets_mark_colour_and_shape_in_the_cell_of_the_centre():
    targets = pretrain.cell_targets(_scene(), grid=2)  # 16-px cells
    assert targets.shape == (4, 2, 2, len(pretrain.ATTRIBUTES))
    assert np.flatnonzero(targets[0, 0, 0]).tolist() == [RED, SQUARE]
    assert np.flatnonzero(targets[2, 1, 0]).tolist() == [BLUE, SQUARE]  # recoloured from frame 2
    assert np.flatnonzero(targets[3, 1, 1]).tolist() == [BLUE, SQUARE]
    assert targets.sum() == 4 * 2  # one object, two marks a frame, nowhere else


def test_hidden_objects_mark_nothing():
    scene = _scene()
    scene.events = [Event("enters", "square", 2)]
    targets = pretrain.cell_targets(scene, grid=2)
    assert targets[:2].sum() == 0 and targets[2:].sum() == 2 * 2


def test_pretraining_is_deterministic_and_lowers_the_loss(built):
    params = load_params(built / "params.yaml")
    model, processor = load_model_and_processor(built / "artifacts/base")
    grid = params.base.tiny.image_size // params.base.tiny.patch_size // 2
    videos, targets = base.pretraining_set(built / "artifacts/prepare", built / "data/videos", grid)
    assert len(videos) == 6 and targets[0].shape == (8, grid, grid, len(pretrain.ATTRIBUTES))
    cfg = VisionPretrainConfig(steps=40, batch_size=16, learning_rate=3e-3, heldout=0.2)
    runs = []
    for _ in range(2):
        model, processor = load_model_and_processor(built / "artifacts/base")
        runs.append(pretrain.pretrain_vision(model, processor, videos, targets, cfg, seed=3))
    assert runs[0].losses == runs[1].losses and runs[0].probe == runs[1].probe
    assert np.mean(runs[0].losses[-5:]) < 0.5 * np.mean(runs[0].losses[:5])
    assert set(runs[0].probe) == {"colour", "shape", "cells"} and runs[0].probe["cells"] > 0


def test_centred_projector_gives_zero_mean_tokens_of_text_embedding_length(built):
    model, processor = load_model_and_processor(built / "artifacts/base")
    videos, _ = base.pretraining_set(built / "artifacts/prepare", built / "data/videos", 2)
    model.model.multi_modal_projector.linear_2.bias.data += 5.0  # one large vector shared by every token
    report = pretrain.centre_projector(model, processor, videos)
    assert report["cosine_before"] > 0.9 and report["cosine_after"] < 0.2
    pixels = processor.video_processor(videos=videos, return_tensors="pt")["pixel_values_videos"]
    with torch.no_grad():
        tokens = model.get_video_features(pixel_values_videos=pixels).pooler_output.flatten(0, -2)
    text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    assert tokens.mean(0).abs().max() < 1e-4
    torch.testing.assert_close(tokens.norm(dim=-1).mean(), text_norm, rtol=1e-4, atol=1e-6)


def test_base_stage_saves_its_pretraining_report(built):
    report = json.loads((built / "artifacts/base" / base.PRETRAINING).read_text())
    params = load_params(built / "params.yaml")
    assert len(report["losses"]) == params.base.tiny.pretrain.steps
    assert {"colour", "shape"} <= set(report["probe"]) and {"cosine_before", "cosine_after"} == set(report["projector"])


def test_pretraining_without_scenes_names_the_file_and_the_way_out(project):
    params = load_params("params.yaml")
    prepare.run(params)
    (prepare.OUT / "scenes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scenes\.json.*base\.tiny\.pretrain\.steps: 0"):
        base.materialise(params, prepare.OUT)


@pytest.mark.parametrize("tower, projector", [(False, False), (False, True), (True, True)])
def test_sft_freezes_the_parts_it_is_told_to(built, tower, projector):
    params = load_params(built / "params.yaml")
    model, _ = load_model_and_processor(built / "artifacts/base")
    cfg = params.sft.__class__(train_vision_tower=tower, train_projector=projector)
    sft.set_trainable(model, cfg, params.base.family)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(v == tower for n, v in grads.items() if "vision_tower" in n)
    assert all(v == projector for n, v in grads.items() if "multi_modal_projector" in n)
    assert all(v for n, v in grads.items() if "language_model" in n or "lm_head" in n)
