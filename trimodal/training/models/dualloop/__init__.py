"""`dualloop` — the fusion network trained with a double loop (`model.py`) and its learned learning-rate
controller (`controller.py`)."""

from trimodal.training.models.dualloop.model import DualLoopModel, dualloop  # noqa: F401  (registers "dualloop")
