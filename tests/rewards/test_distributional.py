"""Distributional rewards: the set metrics against scipy/numpy, the rewards against brute force and recomputation,
the exemplar cache, gradients by finite differences, and named errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from pixel_gradients import assert_pixel_gradient

from mmalign import MediaBatch
from mmalign.rewards import build
from mmalign.rewards.distributional import ExemplarSet
from mmalign.rewards.set_metrics import (
    frechet_distance,
    gaussian_stats,
    kid,
    kid_within,
    leave_one_out,
    vendi,
)

SET_REWARDS = ("exemplar_fd", "exemplar_kid", "vendi")


def _numpy_cov_stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrtm(a, iterations=50):
    """Matrix square root by the Denman–Beavers iteration (scipy is not a dependency): no eigenvalues involved."""
    y, z = a, np.eye(len(a))
    for _ in range(iterations):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_frechet_distance_matches_a_sqrtm_reference():
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64) * 1.5 + 0.3
    (m1, s1), (m2, s2) = _numpy_cov_stats(x.numpy()), _numpy_cov_stats(y.numpy())
    root = _sqrtm(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, rtol=1e-10, atol=1e-12)
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert float(frechet_distance(x, y)) == pytest.approx(reference, rel=1e-9)
    assert float(frechet_distance(x, gaussian_stats(y))) == pytest.approx(reference, rel=1e-9)
    assert float(frechet_distance(x, x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.randn(30, 10, dtype=torch.float64)
    (m1, s1), (m2, s2) = _numpy_cov_stats(x.numpy()), _numpy_cov_stats(y.numpy())
    roots = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # singular Σx: sqrtm is ill-conditioned here
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * roots
    assert float(frechet_distance(x.float(), y.float())) == pytest.approx(reference, rel=1e-6)


def test_kid_is_the_unbiased_mmd_of_a_loop():
    x, y = torch.randn(5, 4), torch.randn(7, 4) + 0.5
    a, b, d = x.double().numpy(), y.double().numpy(), 4

    def k(u, v):
        return (u @ v / d + 1) ** 3

    xx = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(a[i], b[j]) for i in range(5) for j in range(7)) / (5 * 7)
    assert float(kid(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert float(kid_within(y, chunk=3)) == pytest.approx(yy, rel=1e-12)  # chunks cover every row once
    assert float(kid(x, y, kid_within(y))) == float(kid(x, y))


def test_vendi_matches_numpy_eigenvalues():
    x = torch.randn(6, 4)
    unit = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    lam = np.linalg.eigvals(unit @ unit.T / 6).real
    lam = lam[lam > 1e-12]
    assert float(vendi(x)) == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    assert float(vendi(torch.eye(3, 5))) == pytest.approx(3.0, abs=1e-12)


def test_leave_one_out_is_the_change_from_removing_each_row():
    x, y = torch.randn(5, 3), torch.randn(9, 3)
    loo = leave_one_out(lambda s: -frechet_distance(s, y), x)
    for i in range(5):
        rest = torch.cat([x[:i], x[i + 1 :]])
        assert float(loo[i]) == pytest.approx(float(frechet_distance(rest, y) - frechet_distance(x, y)), rel=1e-9)


# ------------------------------------------------------------------------------------------------ the rewards
@pytest.fixture(scope="module")
def exemplars():
    return torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def batch():
    return MediaBatch(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4)), ["a red circle"] * 5)


def make(name, folder, exemplars=None, **options):
    spec = {"name": name, "model": str(folder), "pretrained": None, **options}
    return build(spec if name == "vendi" else {**spec, "exemplars": exemplars})


def test_instance_rewards_against_brute_force(tiny_open_clip_dir, exemplars, batch):
    similarity = make("exemplar_similarity", tiny_open_clip_dir, exemplars)
    knn = make("exemplar_knn", tiny_open_clip_dir, exemplars, k=3)
    assert (similarity.scope, knn.scope) == ("sample", "sample") and similarity.differentiable and knn.differentiable
    with torch.no_grad():
        x, e = knn.backbone.encode_image(batch.pixels).double(), knn.backbone.encode_image(exemplars).double()
    for i in range(len(batch)):
        cosines = [float(x[i] @ e[j]) for j in range(len(e))]
        assert float(similarity(batch).scores[i]) == pytest.approx(sum(cosines) / len(e), rel=1e-5)
        nearest = sorted(float((x[i] - e[j]).norm()) for j in range(len(e)))[:3]
        assert float(knn(batch).scores[i]) == pytest.approx(-sum(nearest) / 3, rel=1e-5)


def test_text_exemplars_score_the_mean_cosine_to_the_texts(tiny_open_clip_dir, batch):
    texts = ["a red circle", "a blue square", "two green triangles"]
    reward = make("exemplar_similarity", tiny_open_clip_dir, texts)
    assert reward.exemplar_kind == "texts"
    with torch.no_grad():
        x, t = reward.backbone.encode_image(batch.pixels), reward.backbone.encode_text(texts)
    torch.testing.assert_close(reward(batch).scores, (x @ t.T).mean(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SET_REWARDS)
def test_set_rewards_give_the_set_value_and_leave_one_out_by_recomputation(name, tiny_open_clip_dir, exemplars, batch):
    reward = make(name, tiny_open_clip_dir, exemplars)
    assert reward.scope == "set" and reward.differentiable
    out = reward(batch)
    with torch.no_grad():
        x, e = reward.backbone.encode_image(batch.pixels), reward.backbone.encode_image(exemplars)
    expected = {"exemplar_fd": lambda: -frechet_distance(x, e), "exemplar_kid": lambda: -kid(x, e),
                "vendi": lambda: vendi(x)}[name]()
    torch.testing.assert_close(out.scores, expected.float().repeat(len(batch)), atol=1e-6, rtol=1e-5)
    for i in range(len(batch)):
        rest = batch[[j for j in range(len(batch)) if j != i]]
        change = out.scores[0] - reward(rest).scores[0]
        assert float(out.components["leave_one_out"][i]) == pytest.approx(float(change), rel=1e-4, abs=1e-7)


def _write_images(folder, sizes, seed=0):
    folder.mkdir(exist_ok=True)
    rng = np.random.RandomState(seed)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cache_hit_and_invalidation(tiny_open_clip_dir, tmp_path, monkeypatch):
    folder, cache = tmp_path / "exemplars", tmp_path / "cache"
    _write_images(folder, [32, 32, 40, 32])  # mixed sizes: embedded in runs of one size, in file order
    first = make("exemplar_fd", tiny_open_clip_dir, str(folder), cache_dir=str(cache))
    files = list(cache.glob("exemplars-*.safetensors"))
    assert len(files) == 1
    with torch.no_grad():
        one_by_one = torch.cat([first.backbone.encode_image(b.pixels) for b in
                                (MediaBatch.from_pil([Image.open(folder / f"{i}.png")], [""]) for i in range(4))])
    torch.testing.assert_close(first.exemplars, torch.nn.functional.normalize(one_by_one.double(), dim=-1))

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again")

    with monkeypatch.context() as patch:
        patch.setattr(ExemplarSet, "embed", no_embedding)
        second = make("exemplar_fd", tiny_open_clip_dir, str(folder), cache_dir=str(cache))
    assert torch.equal(first.exemplars, second.exemplars)
    _write_images(folder, [32, 32, 40, 32], seed=1)  # same names, new content
    third = make("exemplar_fd", tiny_open_clip_dir, str(folder), cache_dir=str(cache))
    assert len(list(cache.glob("exemplars-*.safetensors"))) == 2
    assert not torch.allclose(first.exemplars, third.exemplars)


def test_content_hash_follows_the_content(exemplars):
    changed = exemplars.clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]
    assert ExemplarSet(exemplars).content_hash() == ExemplarSet(exemplars.clone()).content_hash()
    assert ExemplarSet(exemplars).content_hash() != ExemplarSet(changed).content_hash()
    assert ExemplarSet(["a", "b"]).content_hash() != ExemplarSet(["a", "c"]).content_hash()


@pytest.mark.parametrize("name", ("exemplar_similarity", "exemplar_knn", *SET_REWARDS))
def test_gradients_match_finite_differences(name, tiny_open_clip_dir, exemplars):
    options = {"k": 2} if name == "exemplar_knn" else {}
    reward = make(name, tiny_open_clip_dir, exemplars.double(), dtype="float64", **options)

    def total(p):
        scores = reward(MediaBatch(p, [""] * 4)).scores.double()
        return scores[0] if reward.scope == "set" else scores.sum()

    assert_pixel_gradient(total, batch=4, seed=5)


def test_bad_inputs_get_named_errors(tiny_open_clip_dir, exemplars, batch, tmp_path):
    (tmp_path / "empty").mkdir()
    video = MediaBatch(torch.rand(2, 3, 3, 32, 32), ["", ""])

    def reward(name, exemplars=None, **options):
        return make(name, tiny_open_clip_dir, exemplars, **options)

    cases = [
        (lambda: reward("exemplar_similarity", exemplars[:0]), "exemplars: expected at least one"),
        (lambda: reward("exemplar_similarity", []), "exemplars: expected at least one"),
        (lambda: reward("exemplar_similarity", str(tmp_path / "empty")), "found none"),
        (lambda: reward("exemplar_similarity", "a red circle"), "which is not a folder"),
        (lambda: reward("exemplar_similarity", exemplars[0]), r"exemplars: expected .* got a .* \(3, 32, 32\)"),
        (lambda: reward("exemplar_similarity", exemplars * 2), r"exemplars: expected image values in \[0, 1\]"),
        (lambda: reward("exemplar_knn", exemplars, k=8), r"k: expected at most the number of exemplars \(7\), got 8"),
        (lambda: reward("exemplar_knn", exemplars, k=0), "k: expected a positive int"),
        (lambda: reward("exemplar_fd", exemplars[:1]), "exemplars: exemplar_fd expected at least 2"),
        (lambda: reward("exemplar_kid", exemplars)(batch[:2]), "batch: exemplar_kid expected at least 3"),
        (lambda: reward("vendi")(batch[:1]), "batch: vendi expected at least 2"),
        (lambda: reward("exemplar_similarity", exemplars)(video),
         r"batch: exemplar_similarity scores images \(B, C, H, W\), got a video batch of shape \(2, 3, 3, 32, 32\)"),
        (lambda: frechet_distance(torch.randn(5, 4), torch.randn(6, 3)),
         "x, y: expected embeddings of one dimension, got 4 and 3"),
        (lambda: kid(torch.randn(5, 4), torch.randn(6, 3)), "x, y: expected embeddings of one dimension"),
        (lambda: frechet_distance(torch.randn(5), torch.randn(6, 3)),
         r"x: expected \(n, D\) embeddings with n >= 2, got shape \(5,\)"),
        (lambda: vendi(torch.randn(0, 3)), r"embeddings: expected \(n, D\) embeddings with n >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="exemplars: expected a folder of images, .* got int"):
        ExemplarSet(3)
