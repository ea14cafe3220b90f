"""Upload checks: not an image, too many bytes, too many pixels, an unreadable mode, each a message naming the
file and the limit; good files come back as RGB with their own pixels; the server refuses oversized uploads."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.demos.launch import LaunchSettings, Limits, allowed_folders
from mmalign.demos.uploads import image_files, load_upload, load_uploads


def _png(path, mode="RGB", size=(8, 6)):
    image = Image.new(mode, size)
    image.save(path)
    return path


def test_a_good_upload_keeps_its_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    image = load_upload(tmp_path / "a.png", Limits())
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), array)
    grey = load_upload(_png(tmp_path / "g.png", "L"), Limits())
    assert grey.mode == "RGB" and grey.size == (8, 6)


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(ValueError, match=r"upload 'x.png': not a readable image .*expected a PNG"):
        load_upload(tmp_path / "x.png", Limits())


def test_too_many_bytes(tmp_path):
    path = tmp_path / "big.bmp"
    Image.new("RGB", (200, 200)).save(path)  # 120 kB uncompressed
    with pytest.raises(ValueError, match=r"upload 'big.bmp': 0.11 MB is too large, expected at most 0.05 MB"):
        load_upload(path, Limits(max_upload_mb=0.05))


def test_too_many_pixels(tmp_path):
    with pytest.raises(ValueError, match=r"upload 'wide.png': 300×6 pixels is too large, expected at most 64"):
        load_upload(_png(tmp_path / "wide.png", size=(300, 6)), Limits(max_image_side=64))


@pytest.mark.parametrize("mode", ["I;16", "F", "CMYK"])
def test_modes_without_an_8_bit_reading_are_refused(tmp_path, mode):
    path = tmp_path / ("m.tif" if mode in ("F", "CMYK") else "m.png")
    Image.new(mode, (4, 4)).save(path)
    with pytest.raises(ValueError, match=f"image mode '{mode}' is not supported"):
        load_upload(path, Limits())


def test_too_many_files_and_limit_settings(tmp_path):
    paths = [_png(tmp_path / f"{i}.png") for i in range(3)]
    assert len(load_uploads(paths, Limits(max_images=3))) == 3
    with pytest.raises(ValueError, match="uploads: 3 files, expected at most 2 per request"):
        load_uploads(paths, Limits(max_images=2))
    with pytest.raises(ValueError, match="max_upload_mb: expected a size in MB > 0, got 0"):
        Limits(max_upload_mb=0)
    with pytest.raises(ValueError, match="concurrency: expected a positive int, got 0"):
        LaunchSettings(concurrency=0)


def test_allowed_folders_and_their_images(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "b.png")
    _png(tmp_path / "a.jpg")
    (tmp_path / "c.txt").write_text("no")
    assert allowed_folders([tmp_path, str(tmp_path)]) == (str(tmp_path.resolve()),)
    with pytest.raises(ValueError, match="--allow-dir: expected an existing folder, got 'nope'"):
        allowed_folders(["nope"])
    assert image_files([tmp_path]) == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.png")]


def test_the_server_refuses_uploads_over_the_limit(tmp_path):
    pytest.importorskip("gradio")
    from demo_server import served
    from gradio_client import Client, handle_file

    from mmalign.demos.rewards_demo import build_rewards_demo
    from mmalign.rewards import build

    path = tmp_path / "big.bmp"
    Image.new("RGB", (200, 200)).save(path)
    demo = build_rewards_demo(None, {"jpeg": build("jpeg_compressibility")}, Limits(max_upload_mb=0.05))
    with served(demo, limits=Limits(max_upload_mb=0.05)) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="(?i)too large|maximum|size"):
            client.predict("", [handle_file(str(path))], [], api_name="/score_uploads")
        small = _png(tmp_path / "small.png")
        _, table, details = client.predict("", [handle_file(str(small))], [], api_name="/score_uploads")
        assert details["notes"]["verdict"].startswith("no gold verdict to draw")
        assert table["headers"][:3] == ["image", "seed", "jpeg"]


def test_files_are_served_only_from_the_allowed_folders(tmp_path):
    pytest.importorskip("gradio")
    import urllib.error
    import urllib.request

    from demo_server import served

    from mmalign.demos.rewards_demo import build_rewards_demo
    from mmalign.rewards import build

    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir(), other.mkdir()
    inside, outside = _png(allowed / "in.png"), _png(other / "out.png")

    def status(url: str, path) -> int:
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}") as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    demo = build_rewards_demo(None, {"jpeg": build("jpeg_compressibility")}, allowed_dirs=[str(allowed)])
    with served(demo, allowed_dirs=allowed_folders([allowed])) as url:
        assert status(url, inside.resolve()) == 200
        assert status(url, outside.resolve()) == 403
        assert status(url, Path(__file__).resolve()) == 403  # nor the working tree
