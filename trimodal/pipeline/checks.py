"""Byte-level checks shared by `validate` and `shard`: does an image decode, is a wav whole and in format."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

from PIL import Image

# FACC's format: 16 kHz, mono, 16-bit PCM.
EXPECTED_RATE, EXPECTED_CHANNELS, EXPECTED_BITS = 16_000, 1, 16
_PCM, _EXTENSIBLE = 1, 0xFFFE
_WAV_HEADER_PROBE = 4096


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


def wav_problem(header: bytes, file_size: int) -> tuple[str, str] | None:
    """(kind, detail) when a wav is unreadable, in the wrong format or shorter than its header says.

    `header` needs to reach the start of the data chunk; `file_size` is the length of the whole file.
    Kinds: corrupt_wav, bad_wav_format, truncated_wav.
    """
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
            if (audio_format, channels, rate, bits) != (_PCM, EXPECTED_CHANNELS, EXPECTED_RATE, EXPECTED_BITS):
                kind = "PCM" if audio_format == _PCM else f"format tag {audio_format}"
                return "bad_wav_format", f"{kind}, {channels} channel(s), {rate} Hz, {bits}-bit; expected 16 kHz mono 16-bit PCM"
            declared = chunk_size // block_align
            present = max(0, file_size - body) // block_align
            if declared == 0:
                return "corrupt_wav", "no audio frames"
            if present < declared:
                return "truncated_wav", f"{present} sample frames present, header declares {declared}"
            return None
        position = body + chunk_size + (chunk_size & 1)
    if position + 8 > file_size:
        return "corrupt_wav", "no data chunk"
    return "corrupt_wav", f"header larger than {len(header)} bytes"


def wav_file_problem(path: Path) -> tuple[str, str] | None:
    """`wav_problem` for a file on disk, reading only its header."""
    try:
        with open(path, "rb") as reader:
            header = reader.read(_WAV_HEADER_PROBE)
            size = reader.seek(0, io.SEEK_END)
    except OSError as error:
        return "corrupt_wav", f"cannot read: {error.strerror}"
    return wav_problem(header, size)
