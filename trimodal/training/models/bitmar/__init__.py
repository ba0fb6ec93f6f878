"""`bitmar` — BabyLM's multimodal family (`model.py`): BitNet b1.58 layers (`bitnet.py`), Larimar's episodic
memory (`larimar.py`), caption generation (`generation.py`) and its evaluation (`captioning.py`, `plots.py`)."""

from trimodal.training.models.bitmar.model import BitMar, bitmar  # noqa: F401  (registers "bitmar")
