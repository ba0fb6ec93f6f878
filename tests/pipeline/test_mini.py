import time

import numpy as np
import pytest
import soundfile
from PIL import Image

from trimodal.pipeline.datasets import download_dataset
from trimodal.pipeline.download.marker import read_marker
from trimodal.pipeline.sources.mini import synthesize_mini
from trimodal.pipeline.synthesize.shapes import COLOURS, SPLIT_SIZES, plan_images
from trimodal.pipeline.datasets import validate_dataset


def test_mini_is_laid_out_like_flickr8k_plus_facc(mini_root):
    mini = mini_root / "mini"
    assert len(list((mini / "Flicker8k_Dataset").glob("*.jpg"))) == 300
    assert len((mini / "Flickr8k.token.txt").read_text().splitlines()) == 1500
    assert len((mini / "Flickr_8k.testImages.txt").read_text().splitlines()) == SPLIT_SIZES["test"] >= 60
    assert len(list((mini / "flickr_audio" / "wavs").glob("*.wav"))) == 1500
    assert read_marker(mini_root, "mini")["complete"] is True


def test_mini_validates_cleanly(mini_root):
    report = validate_dataset("mini", mini_root)
    assert report.ok and not [p for p in report.problems if p.severity == "warning"]


def test_mini_wavs_are_16khz_mono_16bit(mini_root):
    for wav in sorted((mini_root / "mini" / "flickr_audio" / "wavs").glob("*.wav"))[:20]:
        info = soundfile.info(wav)
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert 0.5 < info.duration < 8


def test_captions_describe_their_image(mini_root):
    """The shape's colour named in the caption is the colour at the shape's centre."""
    mini = mini_root / "mini"
    captions = {}
    for line in (mini / "Flickr8k.token.txt").read_text().splitlines():
        key, text = line.split("\t")
        captions.setdefault(key.split(".")[0], []).append(text)
    for image in plan_images()[:40]:
        assert all(image.colour in text and image.shape in text for text in captions[image.key])
        pixels = np.asarray(Image.open(mini / "Flicker8k_Dataset" / f"{image.key}.jpg").convert("RGB"), dtype=float)
        if image.size == "large" and image.shape in ("circle", "square"):
            from trimodal.pipeline.synthesize.shapes import POSITIONS

            x = int(POSITIONS[image.position] * pixels.shape[1])
            centre = pixels[pixels.shape[0] // 2 - 2 : pixels.shape[0] // 2 + 3, x - 2 : x + 3].mean(axis=(0, 1))
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
            assert nearest == image.colour


def test_a_second_download_of_mini_does_nothing(mini_root):
    before = sorted(p.stat().st_mtime_ns for p in (mini_root / "mini").rglob("*"))
    assert download_dataset("mini", mini_root).already_complete
    assert sorted(p.stat().st_mtime_ns for p in (mini_root / "mini").rglob("*")) == before


def test_the_fallback_speech_is_deterministic_and_carries_the_words(tmp_path):
    started = time.monotonic()
    synthesize_mini(tmp_path / "a" / "mini", use_espeak=False)
    assert time.monotonic() - started < 60
    synthesize_mini(tmp_path / "b" / "mini", use_espeak=False)
    wavs = sorted((tmp_path / "a" / "mini" / "flickr_audio" / "wavs").glob("*.wav"))
    assert len(wavs) == 1500
    for wav in wavs[:10]:
        assert wav.read_bytes() == (tmp_path / "b" / "mini" / "flickr_audio" / "wavs" / wav.name).read_bytes()
    # Different captions sound different: their lengths follow their word counts.
    assert len({soundfile.info(w).frames for w in wavs[:50]}) > 5
    assert validate_dataset("mini", tmp_path / "a", workers=2).ok


@pytest.mark.skipif(not __import__("shutil").which("espeak-ng"), reason="espeak-ng not installed")
def test_espeak_speech_is_recorded_in_the_marker(mini_root):
    assert "eSpeak" in read_marker(mini_root, "mini")["speech"]
