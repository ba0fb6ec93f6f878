"""The built-in mini dataset: coloured shapes, captions that describe them, and those captions spoken.

Laid out exactly like Flickr8k plus FACC's `flickr_audio/`, so every later step treats it like the real
thing. The shapes, captions and speech come from `trimodal.pipeline.synthesize.shapes`, imported only when
the dataset is made (it needs numpy and Pillow; looking sources up must stay cheap).
"""

from __future__ import annotations

import random
from pathlib import Path

from trimodal.pipeline.sources import flickr8k, register_source
from trimodal.progress import SILENT, Reporter


def synthesize_mini(target: Path, *, seed: int = 0, use_espeak: bool | None = None,
                    reporter: Reporter = SILENT) -> dict:
    """Write the mini dataset into the empty folder `target`; returns what was made."""
    from trimodal.pipeline.synthesize.shapes import SPEAKERS, TEMPLATES, draw_image, plan_images, speak_all, speech_engine

    speak, speech = speech_engine(use_espeak)
    images = plan_images(seed)
    rng = random.Random(seed + 1)
    image_dir = target / "Flicker8k_Dataset"
    wav_dir = target / "flickr_audio" / "wavs"
    image_dir.mkdir(parents=True)
    wav_dir.mkdir(parents=True)

    token_lines, utterances = [], []
    for image in images:
        for caption_id, template in enumerate(rng.sample(TEMPLATES, 5)):
            text = image.caption(template)
            speaker = rng.randrange(len(SPEAKERS))
            token_lines.append(f"{image.key}.jpg#{caption_id}\t{text}\n")
            utterances.append((f"{image.key}_{caption_id}.wav", image.key, caption_id, text, speaker))

    with reporter.task("draw images", total=len(images)) as task:
        for image in images:
            draw_image(image, rng).save(image_dir / f"{image.key}.jpg", "JPEG", quality=90)
            task.advance()
    speak_all([(wav_dir / wav, text, speaker) for wav, _, _, text, speaker in utterances], speak, reporter)

    (target / "Flickr8k.token.txt").write_text("".join(token_lines), encoding="utf-8")
    for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")):
        keys = [image.key for image in images if image.split == split]
        rng.shuffle(keys)
        (target / file_name).write_text("".join(f"{key}.jpg\n" for key in keys), encoding="utf-8")
    rng.shuffle(utterances)  # FACC's wav2capt.txt is not sorted either
    audio_dir = target / "flickr_audio"
    (audio_dir / "wav2capt.txt").write_text(
        "".join(f"{wav} {key}.jpg #{n}\n" for wav, key, n, _, _ in utterances), encoding="utf-8")
    (audio_dir / "wav2spk.txt").write_text(
        "".join(f"{wav} {speaker + 1}\n" for wav, _, _, _, speaker in utterances), encoding="utf-8")
    (target / "readme.txt").write_text(
        "trimodal mini dataset: synthetic shapes with templated captions and spoken captions.\n"
        f"Laid out like Flickr8k + FACC. Seed {seed}. Speech: {speech}.\n", encoding="utf-8")
    return {"images": len(images), "utterances": len(utterances), "speech": speech, "seed": seed}


# The mini dataset is laid out exactly like Flickr8k + FACC, so Flickr8k's reader reads it.
register_source("mini", synthesize=synthesize_mini)(flickr8k.scan)
