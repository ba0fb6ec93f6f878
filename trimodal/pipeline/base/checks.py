"""Byte-level checks shared by `validate` and `shard`: does an image decode, is a wav whole and in format."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_WAV_HEADER_PROBE = 4096


@dataclass(frozen=True)
class WavFormat:
    rate: int
    channels: int
    bits: int
    audio_format: int = _PCM

    def describe(self) -> str:
        kind = {_PCM: "PCM", _FLOAT: "float"}.get(self.audio_format, f"format tag {self.audio_format}")
        return f"{self.rate} Hz, {self.channels} channel(s), {self.bits}-bit {kind}"


# FACC's format, which its corpus promises and validate enforces.
PCM_16K_MONO = WavFormat(rate=16_000, channels=1, bits=16)


def image_problem(data: bytes) -> str | None:
    """Why these image bytes do not decode, or None. Decodes fully (at reduced scale, which still
    reads every entropy-coded byte), so a truncated jpg is caught."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except Exception as error:  # PIL raises many types for bad data
        return f"does not decode: {error}"
    return None


def wav_problem(header: bytes, file_size: int, expected: WavFormat | None = PCM_16K_MONO) -> tuple[str, str] | None:
    """(kind, detail) when a wav is unreadable, in the wrong format or shorter than its header says.

    `header` needs to reach the start of the data chunk; `file_size` is the length of the whole file.
    With `expected` None any PCM or float wav is accepted (featurize resamples and downmixes).
    Kinds: corrupt_wav, bad_wav_format, truncated_wav.
    """
    found = wav_format(header, file_size)
    return found if isinstance(found, tuple) else format_problem(found, expected)


def format_problem(found: WavFormat, expected: WavFormat | None) -> tuple[str, str] | None:
    if expected is not None and found != expected:
        return "bad_wav_format", f"{found.describe()}; expected {expected.describe()}"
    if expected is None and found.audio_format not in (_PCM, _FLOAT):
        return "bad_wav_format", f"{found.describe()}; expected PCM or float samples"
    return None


def wav_format(header: bytes, file_size: int) -> WavFormat | tuple[str, str]:
    """The format of a whole wav, or (kind, detail) when it is corrupt or truncated."""
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return "corrupt_wav", "not a RIFF/WAVE file"
    position, fmt = 12, None
    while position + 8 <= len(header):
        chunk_id, chunk_size = header[position : position + 4], struct.unpack_from("<I", header, position + 4)[0]
        body = position + 8
        if chunk_id == b"fmt ":
            if body + 16 > len(header):
                return "corrupt_wav", "fmt chunk is cut short"
            fmt = struct.unpack_from("<HHIIHH", header, body)
            if fmt[0] == _EXTENSIBLE and body + 26 <= len(header):
                fmt = (struct.unpack_from("<H", header, body + 24)[0],) + fmt[1:]
        elif chunk_id == b"data":
            if fmt is None:
                return "corrupt_wav", "data chunk before any fmt chunk"
            audio_format, channels, rate, _, block_align, bits = fmt
            if block_align == 0:
                return "corrupt_wav", "fmt chunk declares a block size of 0"
            declared = chunk_size // block_align
            present = max(0, file_size - body) // block_align
            if declared == 0:
                return "corrupt_wav", "no audio frames"
            if present < declared:
                return "truncated_wav", f"{present} sample frames present, header declares {declared}"
            return WavFormat(rate=rate, channels=channels, bits=bits, audio_format=audio_format)
        position = body + chunk_size + (chunk_size & 1)
    if position + 8 > file_size:
        return "corrupt_wav", "no data chunk"
    return "corrupt_wav", f"header larger than {len(header)} bytes"


def flac_problem(data: bytes) -> tuple[str, str] | None:
    """(kind, detail) when FLAC bytes have no readable stream header or no samples (custom data only)."""
    import soundfile

    if data[:4] != b"fLaC":
        return "corrupt_audio", "not a FLAC file"
    try:
        frames = soundfile.info(io.BytesIO(data)).frames
    except Exception as error:  # libsndfile reports every failure as one of several types
        return "corrupt_audio", f"does not decode: {error}"
    return None if frames > 0 else ("corrupt_audio", "no audio frames")


def wav_file_format(path: Path) -> WavFormat | tuple[str, str]:
    """`wav_format` of a file on disk, reading only its header."""
    try:
        with open(path, "rb") as reader:
            header = reader.read(_WAV_HEADER_PROBE)
            size = reader.seek(0, io.SEEK_END)
    except OSError as error:
        return "corrupt_wav", f"cannot read: {error.strerror}"
    return wav_format(header, size)
