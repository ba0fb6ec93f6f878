"""`mmn` — the Multimodal Memory Network (`model.py`)."""

from trimodal.training.models.mmn.model import MultimodalMemoryNetwork, mmn  # noqa: F401  (registers "mmn")
