"""Search over a trained run's space: `mm index` (FAISS indexes of a split) and `mm search` (a raw query of
any modality against them)."""
