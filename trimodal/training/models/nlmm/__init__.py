"""`nlmm` — the Nested-Learning multimodal model (`model.py`): Continuum Memory System blocks (`cms.py`) whose
levels are stepped on their own periods (`continuum.py`) by their own optimizers (`optimizers.py`)."""

from trimodal.training.models.nlmm.model import NestedLearningModel, nlmm  # noqa: F401  (registers "nlmm")
