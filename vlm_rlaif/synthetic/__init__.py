"""The synthetic video world: procedural short videos whose ground truth is exact.

scene (sample a scene record) -> render (frames) -> language (questions, descriptions, clip
captions, corruptions) -> oracle (score free text against the scene) -> world (write the
dataset in the release layout). `python -m vlm_rlaif.synthetic` runs the last step.
"""

from vlm_rlaif.synthetic.language import Description, Fact, QA, clip_ranges, corrupt, describe, short_questions
from vlm_rlaif.synthetic.oracle import OracleScore, read_facts, score_answer, score_description
from vlm_rlaif.synthetic.render import render
from vlm_rlaif.synthetic.scene import Scene, SceneError, sample_scene
from vlm_rlaif.synthetic.world import generate_world

__all__ = [
    "QA",
    "Description",
    "Fact",
    "OracleScore",
    "Scene",
    "SceneError",
    "clip_ranges",
    "corrupt",
    "describe",
    "generate_world",
    "read_facts",
    "render",
    "sample_scene",
    "score_answer",
    "score_description",
    "short_questions",
]
