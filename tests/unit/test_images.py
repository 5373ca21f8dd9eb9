import threading
from datetime import datetime

import pytest
from PIL import Image

from webui.io import images
from webui.io.metadata import read_infotext

DATE = datetime(2026, 11, 24, 13, 5, 9)


def _img(color=(10, 20, 30)):
    return Image.new("RGB", (16, 16), color)


def _save(tmp_path, **kw):
    args = dict(outdir=tmp_path, mode="txt2img", infotext="p\nSteps: 1, Seed: 5, Size: 16x16", seed=5,
                prompt="a cat", date=DATE)
    args.update(kw)
    return images.save_image(kw.pop("image", _img()), **{k: v for k, v in args.items() if k != "image"})


def test_layout_and_numbering(tmp_path):
    first = _save(tmp_path, seed=123)
    assert first == tmp_path / "txt2img" / "2026-11-24" / "00000-123.png"
    second = _save(tmp_path, seed=7)
    assert second.name == "00001-7.png"
    (first.parent / "00041-999.png").write_bytes(b"x")  # numbering continues after the largest
    assert _save(tmp_path).name == "00042-5.png"
    assert images.next_number(first.parent) == 43
    assert images.next_number(tmp_path / "missing") == 0


def test_infotext_readable_back(tmp_path):
    text = "a cat, 猫\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 16x16"
    path = _save(tmp_path, infotext=text)
    assert read_infotext(path) == text
    with Image.open(path) as im:
        assert im.size == (16, 16) and im.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("fmt,ext", [("jpeg", "jpg"), ("webp", "webp")])
def test_other_formats_carry_infotext(tmp_path, fmt, ext):
    path = _save(tmp_path, image_format=fmt, image=Image.new("RGBA", (8, 8)))
    assert path.suffix == f".{ext}"
    assert read_infotext(path).startswith("p\nSteps: 1")


def test_pattern_tokens_and_sanitizing(tmp_path):
    path = _save(tmp_path, pattern="[number]-[seed]-[prompt_words]-[model_name]-[date]-[unknown]",
                 prompt='a "cat" / on: the (mat), with a hat and more words here',
                 model_name="my/model:v1")
    assert path.name == "00000-5-a cat _ on_ the mat , with-my_model_v1-2026-11-24-[unknown].png"
    path = _save(tmp_path, pattern="[seed]-[datetime<%H%M>]")
    assert path.name == "00001-5-1305.png"  # the number always leads the name
    path = _save(tmp_path, pattern="[number]")
    assert path.name == "00002.png"


def test_long_prompt_capped(tmp_path):
    path = _save(tmp_path, pattern="[number]-[prompt]", prompt="猫" * 500)
    assert len(path.stem.encode("utf-8")) <= images.MAX_STEM_BYTES
    assert path.exists()


def test_bad_mode_and_format(tmp_path):
    with pytest.raises(ValueError):
        _save(tmp_path, mode="..")
    with pytest.raises(ValueError, match="gif"):
        _save(tmp_path, image_format="gif")
    path = _save(tmp_path, mode="../escape")
    assert tmp_path in path.parents and ".." not in path.parts


class _FailingImage:
    """Writes part of a file, then fails like a full disk."""

    info: dict = {}

    def save(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\npartial")
        raise OSError("No space left on device")


def test_failure_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, image=_FailingImage())
    folder = tmp_path / "txt2img" / "2026-11-24"
    assert list(folder.iterdir()) == []
    assert _save(tmp_path).name == "00000-5.png"  # the failed number was released


def test_concurrent_saves_never_collide(tmp_path):
    paths, errors = [], []
    barrier = threading.Barrier(4)

    def worker(seed):
        try:
            barrier.wait()
            for i in range(6):
                paths.append(_save(tmp_path, seed=seed * 100 + i))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    numbers = sorted(int(p.name.split("-")[0]) for p in paths)
    assert numbers == list(range(24))
    folder = tmp_path / "txt2img" / "2026-11-24"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    for p in paths:
        assert read_infotext(p).startswith("p\n")


def test_stale_reservation_is_skipped_then_cleaned(tmp_path):
    import os
    folder = tmp_path / "txt2img" / "2026-11-24"
    folder.mkdir(parents=True)
    stale = folder / f".00000{images.TMP_SUFFIX}"
    stale.write_bytes(b"half")
    assert _save(tmp_path).name == "00001-5.png"  # a live reservation is respected
    os.utime(stale, (0, 0))
    _save(tmp_path)
    assert not stale.exists()
