import json

from mmalign.cli import main
from mmalign.world.pairs import write_gold_pairs


def test_gold_pairs_and_gold_agrees_with_itself(tmp_path, tiny_sd_factory):
    path = write_gold_pairs(tmp_path / "pairs", n_prompts=2, samples_per_prompt=3, ties=True, num_steps=2,
                            pipeline=tiny_sd_factory(seed=0), progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 * 3  # C(3, 2) pairs per prompt, ties kept
    for row in rows:
        expected = "tie" if row["gold_a"] == row["gold_b"] else "a" if row["gold_a"] > row["gold_b"] else "b"
        assert row["label"] == expected and (tmp_path / "pairs" / row["a"]).is_file()
    out = tmp_path / "acc.json"
    assert main(["eval", "reward", "--pairs", str(path), "--reward", "gold", "--protocol", "pickapic",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["accuracy"]["gold"]["pickapic"] == 1.0
