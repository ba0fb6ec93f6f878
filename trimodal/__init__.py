"""trimodal: image / text / speech datasets as shards and cached features, and retrieval models on them."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The training data path needs torch; import it only when it is asked for.
    if name == "TrimodalDataset":
        from trimodal.training.data import TrimodalDataset

        return TrimodalDataset
    raise AttributeError(f"module 'trimodal' has no attribute {name!r}")
