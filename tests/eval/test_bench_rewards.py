import json

from mmalign.cli import main
from mmalign.eval.bench_rewards import bench_rewards, naive_clip_loop
from mmalign.media import MediaBatch


def test_naive_loop_scores_what_the_reward_scores(tiny_open_clip_dir):
    """The reference loop is a fair comparison: same model, same scores as the batched reward."""
    import torch

    from mmalign.rewards import build

    batch = MediaBatch(torch.rand(3, 3, 32, 32), ["a", "b", "c"])
    naive = naive_clip_loop(tiny_open_clip_dir)(MediaBatch.from_pil(batch.to_pil(), batch.prompts))
    ours = build({"name": "clip", "model": str(tiny_open_clip_dir), "clamp": False})(MediaBatch.from_pil(batch.to_pil(), batch.prompts))
    torch.testing.assert_close(ours.scores, naive.float(), atol=1e-3, rtol=1e-4)


def test_bench_rows_and_command(tiny_open_clip_dir, tmp_path, capsys):
    rows = bench_rewards(tiny_open_clip_dir, batch_sizes=(1, 4), n_images=8, image_size=48)
    assert [(r.reward, r.batch_size) for r in rows] == [("clip", 1), ("clip", 4), ("goal_baseline", 1), ("goal_baseline", 4)]
    assert all(r.images_per_s > 0 and r.speedup > 0 for r in rows)
    out = tmp_path / "bench.json"
    assert main(["bench", "rewards", "--model", str(tiny_open_clip_dir), "--batch-sizes", "2", "--images", "4",
                 "--out", str(out)]) == 0
    assert "speedup" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][0]["batch_size"] == 2


def test_naive_vqascore_loop_scores_what_the_judge_scores():
    """The one-pair-at-a-time reference of the judge bench: same model, same scores as the batched vqascore."""
    import torch

    from mmalign.eval.bench_rewards import naive_vqascore_loop
    from mmalign.rewards import build
    from mmalign.world.vlm import vlm_path

    reward = build({"name": "vqascore", "model": vlm_path()})
    batch = MediaBatch.from_pil(MediaBatch(torch.rand(3, 3, 32, 32), ["a", "b", "c"]).to_pil(), ["a red circle", "x", "two"])
    torch.testing.assert_close(reward(batch).scores, naive_vqascore_loop(reward)(batch), rtol=1e-4, atol=1e-7)


def test_judge_forward_loops_give_the_judges_answer_logits():
    """The forward-only rows time the same computation batched and one row at a time (left padding: the
    answer positions are the last ones in every row)."""
    import torch

    from mmalign.eval.bench_rewards import judge_forward_loops
    from mmalign.rewards import build
    from mmalign.world.vlm import vlm_path

    reward = build({"name": "vqascore", "model": vlm_path()})
    batch = MediaBatch(torch.rand(3, 3, 32, 32), ["a red circle", "x", "two blue squares above"])
    batched, one_at_a_time = judge_forward_loops(reward, batch)
    with torch.no_grad():
        whole, singles = batched().logits, [out.logits for out in one_at_a_time()]
        answer = torch.tensor(reward.processor.tokenizer(reward.answer, add_special_tokens=False)["input_ids"])
        p_yes = whole[:, :-1].log_softmax(-1).gather(-1, answer.expand(3, -1)[..., None])
    torch.testing.assert_close(whole, torch.cat(singles), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_yes.mean((1, 2)).exp(), reward(batch).scores, rtol=1e-4, atol=1e-7)


def test_bench_picks_the_rewards_named(tiny_open_clip_dir):
    import pytest

    from mmalign.world.vlm import vlm_path

    rows = bench_rewards(tiny_open_clip_dir, batch_sizes=(2,), n_images=4, image_size=32, judge=vlm_path(),
                         rewards=("vqascore",))
    assert [(r.reward, r.batch_size) for r in rows] == [("vqascore", 2), ("vqascore_forward", 2)]
    assert all(r.speedup > 0 for r in rows)
    assert [r.reward for r in bench_rewards(tiny_open_clip_dir, (2,), 4, 32, rewards=("goal_baseline", "vqascore"))] == ["goal_baseline"]
    with pytest.raises(ValueError, match="rewards: expected names among"):
        bench_rewards(tiny_open_clip_dir, rewards=("clip", "hps"))
