"""The shapes world: procedural scenes with captions, anti-aliased renders and a gold verifier.

Everything runs on a CPU in seconds and truth is known, so it is the default world of tests, demos and
tutorials (see docs/world.md).
"""

from mmalign.world.assets import load_pipeline, load_proxy, pipeline_path, proxy_path
from mmalign.world.captions import Prompt, caption, prompt_set, read_prompts, vocabulary, write_prompts
from mmalign.world.detect import DetectedObject, Detection, detect
from mmalign.world.gold import GoldReward
from mmalign.world.render import render, render_batch
from mmalign.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneObject,
    layout,
    sample_scenes,
)
from mmalign.world.verify import GoldResult, verify, verify_batch
from mmalign.world.vlm import load_vlm, vlm_path

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DetectedObject",
    "Detection",
    "GoldResult",
    "GoldReward",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "Prompt",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneObject",
    "caption",
    "detect",
    "layout",
    "load_pipeline",
    "load_proxy",
    "load_vlm",
    "pipeline_path",
    "prompt_set",
    "proxy_path",
    "read_prompts",
    "render",
    "render_batch",
    "sample_scenes",
    "verify",
    "verify_batch",
    "vlm_path",
    "vocabulary",
    "write_prompts",
]
