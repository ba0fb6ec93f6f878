"""Drawing and speaking for the synthetic datasets (mini, mini-coco): shape images and spoken captions.

Speech comes from espeak-ng when it is on PATH (resampled to 16 kHz mono 16-bit, as FACC) and from a
small deterministic synthesiser otherwise: each word becomes its own chord of tones, so the audio still
carries the caption word by word. Kept out of `sources/` so that looking sources up (every `mm`
command) does not import numpy and Pillow.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess
import wave
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trimodal.progress import SILENT, Reporter

SAMPLE_RATE = 16_000
IMAGE_SIZE = (200, 150)
SPLIT_SIZES = {"train": 200, "val": 40, "test": 60}

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 170), "orange": (250, 140, 10),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SIZES = {"small": 0.22, "large": 0.42}
POSITIONS = {"on the left": 0.28, "in the middle": 0.5, "on the right": 0.72}

TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background .",
    "a {colour} {shape} {position} .",
    "there is a {colour} {shape} against {background}",
    "one {size} {shape} painted {colour} {position} .",
    "the picture shows a {colour} {shape}",
    "a {background} picture with a {colour} {shape} .",
    "a {colour} {shape} that is {size}",
)



@dataclass(frozen=True)
class MiniImage:
    key: str
    split: str
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self, template: str) -> str:
        return template.format(shape=self.shape, colour=self.colour, background=self.background,
                               size=self.size, position=self.position)


def plan_images(seed: int = 0) -> list[MiniImage]:
    rng = random.Random(seed)
    images = []
    for split, count in SPLIT_SIZES.items():
        for _ in range(count):
            number = len(images)
            digest = hashlib.sha1(f"mini-{seed}-{number}".encode()).hexdigest()[:10]
            images.append(MiniImage(
                key=f"{3000000000 + number * 7919}_{digest}", split=split, shape=rng.choice(SHAPES),
                colour=rng.choice(list(COLOURS)), background=rng.choice(list(BACKGROUNDS)),
                size=rng.choice(list(SIZES)), position=rng.choice(list(POSITIONS)),
            ))
    return images


# (espeak-ng voice, words per minute, pitch 0-99): ten "speakers".
SPEAKERS = (
    ("en-us", 165, 50), ("en-gb", 150, 40), ("en-us+f3", 170, 65), ("en+m3", 140, 35),
    ("en-gb-x-rp", 155, 55), ("en-us+f2", 160, 72), ("en-029", 150, 45), ("en-gb-scotland", 145, 50),
    ("en-us+m7", 175, 30), ("en+f4", 150, 60),
)


def speech_engine(use_espeak: bool | None = None):
    """(speak(text, speaker) -> float32 samples at 16 kHz, description): espeak-ng when on PATH."""
    espeak = shutil.which("espeak-ng") if use_espeak in (None, True) else None
    if espeak:
        return (lambda text, speaker: _espeak(espeak, text, speaker)), _espeak_version(espeak)
    return _tone_speech, "built-in tone synthesiser"


def speak_all(jobs: list[tuple[Path, str, int]], speak, reporter: Reporter = SILENT) -> None:
    """Write each (wav path, text, speaker) on 4 threads (espeak-ng runs as a subprocess)."""
    with reporter.task("speak captions", total=len(jobs)) as task, ThreadPoolExecutor(4) as pool:
        def one(job):
            path, text, speaker = job
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, speak(text, speaker))
            task.advance()

        list(pool.map(one, jobs))


def draw_image(image: MiniImage, rng: random.Random) -> Image.Image:
    width, height = IMAGE_SIZE
    background = np.array(BACKGROUNDS[image.background], dtype=np.int16)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, size=(height, width, 3))
    canvas = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    radius = SIZES[image.size] * height * rng.uniform(0.85, 1.15)
    cx = POSITIONS[image.position] * width + rng.uniform(-8, 8)
    cy = height / 2 + rng.uniform(-15, 15)
    colour = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[image.colour])
    if image.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif image.shape == "square":
        draw.rectangle((cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85), fill=colour)
    else:
        corners = {"triangle": 3, "diamond": 4, "star": 10}[image.shape]
        points = []
        for i in range(corners):
            angle = np.pi * 2 * i / corners - np.pi / 2
            r = radius * (0.45 if image.shape == "star" and i % 2 else 1.0)
            points.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
        draw.polygon(points, fill=colour)
    return canvas


def _espeak(binary: str, text: str, speaker: int) -> np.ndarray:
    voice, speed, pitch = SPEAKERS[speaker]
    result = subprocess.run([binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                            capture_output=True, check=True)
    data = result.stdout
    start = data.find(b"data") + 8  # espeak streams: the header's sizes are placeholders
    rate = int.from_bytes(data[24:28], "little")
    samples = np.frombuffer(data[start : start + (len(data) - start) // 2 * 2], dtype="<i2").astype(np.float32)
    return _resample(samples / 32768.0, rate, SAMPLE_RATE)


def _espeak_version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return " ".join(result.stdout.split()[:4]) or "espeak-ng"


def _resample(signal: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (signals here are a few seconds long)."""
    if source_rate == target_rate:
        return signal
    length = int(round(len(signal) * target_rate / source_rate))
    spectrum = np.fft.rfft(signal)
    keep = length // 2 + 1
    spectrum = spectrum[:keep] if len(spectrum) >= keep else np.pad(spectrum, (0, keep - len(spectrum)))
    return np.fft.irfft(spectrum, n=length).astype(np.float32) * (length / len(signal))


def _tone_speech(text: str, speaker: int) -> np.ndarray:
    """Deterministic stand-in for speech: every word is a chord fixed by the word, shifted by speaker."""
    shift = 0.85 + 0.04 * speaker
    pieces = [np.zeros(int(0.1 * SAMPLE_RATE), np.float32)]
    for word in text.split():
        word_seed = zlib.crc32(word.encode())
        word_rng = np.random.default_rng(word_seed)
        seconds = 0.12 + 0.035 * len(word)
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        frequencies = word_rng.uniform(250, 3400, size=3) * shift
        glide = word_rng.uniform(-0.3, 0.3)
        chord = sum(np.sin(2 * np.pi * f * (1 + glide * t) * t) / (k + 1) for k, f in enumerate(frequencies))
        pieces += [(chord * np.hanning(len(t))).astype(np.float32), np.zeros(int(0.05 * SAMPLE_RATE), np.float32)]
    signal = np.concatenate(pieces)
    signal += np.random.default_rng(word_seed + speaker).normal(0, 0.01, len(signal)).astype(np.float32)
    return signal


def write_wav(path: Path, signal: np.ndarray) -> None:
    peak = float(np.abs(signal).max()) or 1.0
    pcm = np.clip(signal / peak * 0.8 * 32767, -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
        writer.writeframes(pcm.tobytes())
    path.write_bytes(buffer.getvalue())
