"""`mm index`: a run's space over one split, as FAISS indexes a query of any modality can search.

Every image, caption and utterance of the split is encoded by the run's encoders from the feature store
(nothing the store holds is computed again), exactly as `mm eval` encodes them, and each modality gets
its own index of the unit-length latents: exact inner product (`IndexFlatIP`, the ranking `mm eval`
scores) up to `APPROXIMATE_FROM` rows, HNSW past it (or as `--exact` / `--approximate` say), whose
recall@10 against the exact index is measured on the split's own cross-modal queries and recorded. OUT holds:

    search.json              what the index is (run, checkpoint, split, shards, store, featurizer record,
                             the model's inputs, counts, index kinds, the run's recalls); written last
    <modality>.faiss         one index per modality (faiss's own serialisation)
    items.json               per image its key, shard, captions and spoken captions (member names); per
                             caption and utterance row its image row and number: what a result shows

A rerun with the same run, checkpoint, shards and store is a no-op; one interrupted after a modality
was written keeps that modality (`progress.json` says which, for which inputs).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.image import file_sha256
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, location, prepare_folder, storage_errors, write_bytes

FORMAT = "trimodal-search/1"
MANIFEST = "search.json"
ITEMS = "items.json"
PROGRESS = "progress.json"
MODALITIES = ("image", "text", "audio")
HNSW_NEIGHBOURS = 32  # faiss's M: links per node
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
RECALL_QUERIES = 1000  # cross-modal queries the approximate index's recall@10 is measured on
# Past this many rows a modality gets HNSW by default: a text query end to end (encode + exact search of
# 128-d rows) took p95 15.2 ms over 250k rows and 53.4 ms over 1M on 2 CPU cores, one thread
# (benchmarks/search.py --items N, docs/benchmarks.md): past the 50 ms a query may take.
APPROXIMATE_FROM = 250_000


@dataclass(frozen=True)
class IndexOptions:
    split: str = "test"
    checkpoint: str = "best"
    shards: str | None = None  # default: the run's
    features: str | None = None  # default: the run's
    approximate: bool | None = None  # HNSW (True), exact (False), or by size (None: APPROXIMATE_FROM)
    device: str = "auto"
    batch_size: int | None = None  # default: the run's eval_batch_size
    onnx: str | None = None  # an `mm export --format onnx` folder of the run: encode on onnxruntime alone


def index_file(out: StoragePath, modality: str) -> StoragePath:
    return out / f"{modality}.faiss"


def default_out(run: str, split: str) -> StoragePath:
    return location(run) / f"index-{split}"


def build_index(run: str, out: str | None = None, options: IndexOptions = IndexOptions(), *,
                reporter: Reporter = SILENT) -> dict:
    """Write the search index of `run` over `options.split` into `out` (default RUN/index-SPLIT); returns
    search.json's content. See the module doc."""
    import torch

    from trimodal.training.data import load_split, open_sources
    from trimodal.training.eval_run import load_run, read_resolved_config
    from trimodal.training.evaluate import embed_split
    from trimodal.training.run_storage import RunFolder
    from trimodal.training.settings import TrainConfig
    from trimodal.training.trainer import CHECKPOINTS, max_audio_frames

    out = location(out) if out is not None else default_out(run, options.split)
    folder = RunFolder(run)
    checkpoint_name = f"{CHECKPOINTS}/{options.checkpoint}.safetensors"
    if options.checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last (got {options.checkpoint!r})")
    folder.fetch(["config.resolved.toml", checkpoint_name])
    resolved = read_resolved_config(folder.local)
    shards = options.shards or resolved["data"]["shards"]
    features = options.features or resolved["data"]["features"]
    sources = open_sources(shards, features, [options.split])
    sources.check(options.split)
    checkpoint_sha = file_sha256(folder.local / checkpoint_name)
    exported = _exported_encoders(options.onnx, checkpoint_sha, options.checkpoint, sources) if options.onnx else None
    fingerprint = hashlib.sha256(json.dumps([FORMAT, checkpoint_sha, sources.store.fingerprint,
                                             json.loads(json.dumps(sources.store.config)), options.split,
                                             options.approximate, "onnxruntime" if exported else "torch"]
                                            ).encode()).hexdigest()
    with storage_errors(f"writing the index {out}"):
        prepare_folder(out)
        existing = _read_json(out / MANIFEST)
        if existing.get("fingerprint") == fingerprint:
            return {**existing, "already_complete": True}
        (out / MANIFEST).unlink(missing_ok=True)  # what follows replaces it: nothing may look complete
        progress = _read_json(out / PROGRESS)
        done = set(progress.get("modalities", [])) if progress.get("fingerprint") == fingerprint else set()

    if exported is not None:  # no model is built: the graphs encode, on onnxruntime
        model, device, inputs = exported, torch.device("cpu"), exported.manifest["inputs"]
    else:
        model, _, device = load_run(folder.local, options.checkpoint, options.device)
        inputs = {**{"image": "embedding", "text": "ids"}, **model.store_inputs()}
    train = resolved["train"]
    frames = max_audio_frames(TrainConfig(max_audio_seconds=float(train["max_audio_seconds"])), sources.store.config)
    with reporter.task(f"read {options.split}", total=None, unit="shards") as task:
        data = load_split(sources, options.split, train["modalities"], frames, inputs)
        task.update(total=1, completed=1)
    items = _items(sources, options.split, data, reporter)
    todo = [m for m in MODALITIES if m in train["modalities"] and _rows(data, m) and m not in done]
    batch_size = options.batch_size or int(train["eval_batch_size"])
    summary = {}
    for modality in todo:
        with reporter.task(f"embed {modality}", total=_rows(data, modality), unit="rows") as task:
            only = _only(data, modality)
            with torch.no_grad():
                latents = embed_split(model, only, device, batch_size, every_batch=True)[modality]
            task.update(completed=_rows(data, modality))
        vectors = np.ascontiguousarray(latents.float().cpu().numpy(), dtype=np.float32)
        summary[modality] = vectors
    # The approximate index's recall is measured with real queries: another modality's latents.
    for modality, vectors in summary.items():
        queries = next((summary[m] for m in MODALITIES if m != modality and m in summary), vectors)
        approximate = options.approximate if options.approximate is not None else len(vectors) >= APPROXIMATE_FROM
        index, record = _make_index(vectors, approximate, queries)
        with storage_errors(f"writing {index_file(out, modality)}"):
            write_bytes(index_file(out, modality), _serialise(index))
        done.add(modality)
        progress = {"fingerprint": fingerprint, "modalities": sorted(done), "records": {
            **progress.get("records", {}), modality: record}}
        write_json(out / PROGRESS, progress)
    missing = [m for m in MODALITIES if m in train["modalities"] and _rows(data, m) and m not in done]
    if missing:
        raise TrimodalError(f"{out}: the {', '.join(missing)} index was not written; run the same command again")
    records = _read_json(out / PROGRESS).get("records", {})
    write_json(out / ITEMS, items)
    manifest = {
        "format": FORMAT, "created_with": f"trimodal {__version__}", "fingerprint": fingerprint,
        "run": str(folder.target), "checkpoint": options.checkpoint, "checkpoint_sha256": checkpoint_sha,
        "split": options.split, "shards": str(sources.shards), "features": str(sources.features),
        "family": resolved["model"]["name"], "store_config": sources.store.config, "inputs": inputs,
        "text_spec": sources.text_spec, "max_audio_frames": frames,
        "modalities": {m: {"rows": _rows(data, m), **records[m]} for m in MODALITIES if m in done},
        "images": len(data.keys), "recalls": _recalls(folder.target, options.split),
        "encoded_with": {"runtime": "onnxruntime", "export": str(exported.folder)} if exported else {"runtime": "torch"},
    }
    write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _exported_encoders(folder: str, checkpoint_sha: str, checkpoint: str, sources):
    """The run's exported encoders (`trimodal.export.runtime.OnnxEncoders`), checked to be of this checkpoint and
    to read this feature store's inputs."""
    from trimodal.export.runtime import OnnxEncoders

    encoders = OnnxEncoders(folder)
    encoders.check_matches({"checkpoint_sha256": checkpoint_sha, "run": "this run", "checkpoint": checkpoint},
                           "this index")
    if json.loads(json.dumps(sources.store.config)) != encoders.manifest["store_config"]:
        raise ConfigError(f"the export {encoders.folder} reads the features of another store than "
                          f"{sources.features} (its featurizer record differs); export the run again or index "
                          "with its own --features")
    return encoders


def _rows(data, modality: str) -> int:
    values = {"image": data.images, "text": data.tokens, "audio": data.mels}[modality]
    return 0 if values is None else len(values)


def _only(data, modality: str):
    """`data` with only `modality` present, so that one modality is encoded at a time."""
    from dataclasses import replace

    return replace(data, images=data.images if modality == "image" else None,
                   tokens=data.tokens if modality == "text" else None,
                   mels=data.mels if modality == "audio" else None)


def _make_index(vectors: np.ndarray, approximate: bool, queries: np.ndarray):
    import faiss

    dim = vectors.shape[1]
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    if not approximate:
        return exact, {"dim": dim, "kind": "exact inner product (IndexFlatIP)"}
    index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    index.hnsw.efSearch = HNSW_EF_SEARCH
    sample = queries[np.random.default_rng(0).permutation(len(queries))[:RECALL_QUERIES]]
    k = min(10, len(vectors))
    _, truth = exact.search(sample, k)
    _, found = index.search(sample, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)]))
    return index, {"dim": dim, "kind": f"HNSW (IndexHNSWFlat, M={HNSW_NEIGHBOURS}, efSearch={HNSW_EF_SEARCH})",
                   "recall_at_10_vs_exact": round(recall, 4), "recall_queries": len(sample)}


def _serialise(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def _items(sources, split: str, data, reporter: Reporter) -> dict:
    """Per image: key, shard, captions and spoken captions; per caption and utterance row: (image row, number).
    Read from the tars (captions as written, wav member names) in the order `load_split` gives the rows."""
    from trimodal.pipeline.read.shards import IMAGE_SUFFIXES, iter_extents

    images, text, audio = [], [], []
    entries = sources.shard_entries(split)
    with reporter.task(f"read captions of {split}", total=len(entries), unit="shards") as task:
        for entry in entries:
            for key, extents, members in iter_extents(sources.shards / entry["name"], {"txt"}):
                captions = members.get("txt", b"").decode("utf-8").splitlines()
                spoken = sorted((int(s.split(".")[0]), s) for s in extents
                                if s.endswith((".wav", ".flac")) and s.split(".")[0].isdigit())
                image = next((s for s in IMAGE_SUFFIXES if s in extents), None)
                row = len(images)
                images.append({"key": key, "shard": entry["name"], "captions": captions,
                               "image": None if image is None else _member(key, image, extents[image]),
                               "utterances": [{**_member(key, suffix, extents[suffix]), "caption": number}
                                              for number, suffix in spoken]})
                text += [[row, n] for n in range(len(captions))]
                audio += [[row, n] for n in range(len(spoken))]
            task.advance(1)
    counts = {"images": (len(images), len(data.keys)), "captions": (len(text), _rows(data, "text")),
              "utterances": (len(audio), _rows(data, "audio"))}
    wrong = {name: pair for name, pair in counts.items() if pair[1] and pair[0] != pair[1]}
    if wrong or [item["key"] for item in images] != list(data.keys):
        raise TrimodalError(f"the shards {sources.shards} do not match the store {sources.features} "
                            f"({', '.join(f'{n}: {a} in the shards, {b} in the store' for n, (a, b) in wrong.items())}"
                            "); featurize them again")
    return {"images": images, "text": text, "audio": audio}


def _member(key: str, suffix: str, extent) -> dict:
    """A member of a shard: its name and where its bytes lie (served without reading the rest of the tar)."""
    return {"member": f"{key}.{suffix}", "offset": extent.offset, "size": extent.size}


def _recalls(run: StoragePath, split: str) -> dict | None:
    """The run's own evaluation of the split (`mm eval`), when there is one: how far to trust the results."""
    result = _read_json(run / f"eval-{split}.json")
    if not result:
        return None
    return {"split": split, "mean_recall": result.get("mean_recall"),
            "directions": {name: {k: v for k, v in metrics.items() if k in ("R@1", "R@5", "R@10")}
                           for name, metrics in result.get("directions", {}).items()}}


def _read_json(path: StoragePath) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_index_bytes(data: bytes):
    """A faiss index from its serialised bytes."""
    import faiss

    return faiss.deserialize_index(np.frombuffer(io.BytesIO(data).getbuffer(), dtype=np.uint8))
