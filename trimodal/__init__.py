"""trimodal: image / text / speech datasets as shards and cached features, and retrieval models on them."""

__version__ = "0.1.0"
