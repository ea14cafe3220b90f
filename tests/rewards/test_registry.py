import textwrap

import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards import ENTRY_POINT_GROUP, Reward, WeightedSum, available, build, register, resolve
from mmalign.rewards.jpeg import JpegCompressibility

BATCH = MediaBatch(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_build_forms():
    assert isinstance(build("jpeg_compressibility"), JpegCompressibility)
    assert build({"name": "jpeg_compressibility", "quality": 80}).quality == 80
    single = build({"name": "jpeg_compressibility", "weight": 2.0})
    assert isinstance(single, WeightedSum) and single.weights == [2.0]
    total = build([{"name": "jpeg_compressibility", "weight": 0.5}, "jpeg_incompressibility"])
    assert total.weights == [0.5, 1.0]
    out = total(BATCH)
    torch.testing.assert_close(out.scores, 0.5 * out.components["jpeg_incompressibility"])


def test_unknown_name_and_option_suggest_the_nearest():
    with pytest.raises(ValueError, match="unknown reward 'jpeg_compresibility'; did you mean 'jpeg_compressibility'"):
        build("jpeg_compresibility")
    with pytest.raises(ValueError, match=r"unknown option 'qualty' \(did you mean 'quality'\?\)"):
        build({"name": "jpeg_compressibility", "qualty": 3})
    with pytest.raises(ValueError, match="expected a 'name' key"):
        build({"quality": 3})
    with pytest.raises(TypeError, match="spec: expected"):
        build(3)


def test_available_lists_builtins_with_descriptions():
    names = available()
    assert {"clip", "jpeg_compressibility", "jpeg_incompressibility"} <= set(names)
    assert names["jpeg_compressibility"].startswith("Negative JPEG size")


class Half(Reward):
    """Half the mean pixel."""

    name = "half"

    def forward(self, batch):
        from mmalign.rewards import RewardOutput

        return RewardOutput(batch.pixels.flatten(1).mean(1) / 2)


def test_register_in_session(monkeypatch):
    monkeypatch.setattr("mmalign.rewards.registry._SESSION", {})
    register("half", Half)
    torch.testing.assert_close(build("half")(BATCH).scores, BATCH.pixels.flatten(1).mean(1) / 2)
    assert available()["half"] == "Half the mean pixel."
    register("not_a_reward", torch.nn.Identity)
    with pytest.raises(TypeError, match="is not an mmalign.rewards.Reward"):
        build("not_a_reward")
    with pytest.raises(ValueError, match="name: expected a non-empty string"):
        register("", Half)


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A reward shipped by another distribution is found through the entry-point group."""
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent(
            '''
            from mmalign.rewards import Reward, RewardOutput

            class Darkness(Reward):
                """One minus the mean pixel."""
                name = "darkness"
                def __init__(self, scale=1.0):
                    super().__init__()
                    self.scale = scale
                def forward(self, batch):
                    return RewardOutput(self.scale * (1 - batch.pixels.flatten(1).mean(1)))
            '''
        )
    )
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ndarkness = my_plugin:Darkness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available()["darkness"] == "One minus the mean pixel."
    reward = build({"name": "darkness", "scale": 2.0})
    torch.testing.assert_close(reward(BATCH).scores, 2 * (1 - BATCH.pixels.flatten(1).mean(1)))
    assert resolve("darkness").__name__ == "Darkness"
