"""`cman` — the cross-modal attention network (`model.py`): frozen pretrained tower tops with LoRA (`lora.py`),
a fusion transformer and the max-margin loss."""

from trimodal.training.models.cman.model import CrossModalAttentionNetwork, cman  # noqa: F401  (registers "cman")
