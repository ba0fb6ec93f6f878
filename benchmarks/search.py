"""Query latency of `mm search` over a large index, against the brute-force numpy baseline in the same run;
and the approximate (HNSW) index's recall@10 against the exact one.

    python benchmarks/search.py [--items 100000] [--queries 200] [--k 10] [--hnsw-sizes 10000,100000]
                                [--threads N] [--workdir /tmp/trimodal-bench-search] [--index INDEX]

Without --index, prepares the mini data in the workdir (`mm download mini`, `mm shard mini`, `mm featurize
--device cpu`), trains mmn-tiny for one epoch and runs `mm index RUN --split test`. The queries are real:
the test split's captions (text), jpgs (image) and wavs (audio), each featurized exactly as the store was and
encoded by the run (`QueryEncoder`, in this process, warm). The index they search is the run's own index of
the split, padded to --items rows with random unit vectors of the latent width (the mini split has 60
images: the padding gives the search the size of a real one; random vectors are the hard case for HNSW,
whose recall is higher on clustered latents).

Per query kind it times, for each query: the encoding (featurize + encoder), the exact FAISS search
(IndexFlatIP, the default of `mm index`) and, in a loop of its own over the same query vectors, the numpy baseline (`vectors @ q`, then argpartition for the
top k) over the same matrix, and checks that both return the same top-k scores (ties may come in either
order). Prints a markdown table (p50 and p95 in ms) and per kind `search TEXT: p95 X ms end to end; faiss / numpy = R (search only)`. Then for each
--hnsw-sizes size: HNSW build time, its p50 search, and recall@10 against the exact index on --queries
random-vector queries, as `hnsw N: recall@10 R, search p50 X ms (exact Y ms)`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

from mini_data import mm, prepare  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build(workdir: Path) -> Path:
    shards, features = prepare(workdir)
    run = workdir / "run"
    mm("train", "configs/mmn-tiny.toml", "--shards", shards, "--features", features, "--out", run,
       "train.epochs=1", "train.num_workers=0", 'train.device="cpu"')
    mm("eval", run, "--split", "test", "--device", "cpu")
    mm("index", run, "--split", "test", "--device", "cpu")
    return run / "index-test"


def queries(index, count: int) -> dict[str, list]:
    """Real queries of each kind from the indexed split's shards: captions, jpgs, wavs."""
    from trimodal.pipeline.read.shards import iter_samples

    found = {"text": [], "image": [], "audio": []}
    for shard in sorted({image["shard"] for image in index.items["images"]}):
        for _, members in iter_samples(index.shards / shard, {"txt", "jpg", "wav"}):
            found["text"] += members.get("txt", b"").decode().splitlines()[:1]
            found["image"] += [members["jpg"]] if "jpg" in members else []
            found["audio"] += [data for suffix, data in members.items() if suffix.endswith(".wav")][:1]
    return {kind: (values * (count // max(1, len(values)) + 1))[:count] for kind, values in found.items() if values}


def padded(index, modality: str, items: int, seed: int = 0) -> np.ndarray:
    """The index's own vectors of `modality`, then random unit vectors up to `items` rows."""
    own = index.index(modality).reconstruct_n(0, index.index(modality).ntotal)
    extra = np.random.default_rng(seed).standard_normal((max(0, items - len(own)), own.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.ascontiguousarray(np.concatenate([own, extra])[:items], dtype=np.float32)


def numpy_top(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ query
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw-sizes", default="10000,100000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-search"))
    parser.add_argument("--index", type=Path, help="An index `mm index` wrote (default: build one on the mini data).")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and faiss (default: torch's own).")
    args = parser.parse_args()

    import faiss
    import torch

    from trimodal.search.searcher import DEFAULT_IN, QueryEncoder, SearchIndex

    index = SearchIndex(args.index or build(args.workdir))
    if args.threads:
        torch.set_num_threads(args.threads)  # torch and faiss share one OpenMP runtime: both
    encoder = QueryEncoder(index.manifest, "cpu")
    print(f"index: {index.path} ({index.manifest['family']}, {index.manifest['images']} images of "
          f"{index.manifest['split']}), padded to {args.items:,} rows per searched modality; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads (torch {torch.get_num_threads()})")
    rows, summary = [], []
    matrices = {}
    for kind, values in queries(index, args.queries).items():
        modality = DEFAULT_IN[kind]
        if modality not in matrices:
            vectors = padded(index, modality, args.items)
            flat = faiss.IndexFlatIP(vectors.shape[1])
            flat.add(vectors)
            matrices[modality] = (vectors, flat)
        vectors, flat = matrices[modality]
        encoder.encode(kind, values[0])  # warm
        encode_ms, faiss_ms, numpy_ms, total_ms, found = [], [], [], [], []
        for value in values:  # as `mm search` answers: encode, then search
            started = time.perf_counter()
            vector = encoder.encode(kind, value)
            encoded = time.perf_counter()
            scores, _ = flat.search(vector.reshape(1, -1), args.k)
            searched = time.perf_counter()
            encode_ms.append(1e3 * (encoded - started))
            faiss_ms.append(1e3 * (searched - encoded))
            total_ms.append(1e3 * (searched - started))
            found.append((vector, scores[0]))
        # The baseline in a loop of its own: numpy's BLAS threads spin after a product and would slow the next
        # query's encoding if interleaved.
        for vector, scores in found:
            started = time.perf_counter()
            baseline = numpy_top(vectors, vector, args.k)
            numpy_ms.append(1e3 * (time.perf_counter() - started))
            # Scores, not rows: equal vectors (a caption written twice) tie, and ties may come in either order.
            if not np.allclose(scores, vectors[baseline] @ vector, atol=1e-5):
                raise SystemExit(f"faiss and numpy disagree on the top {args.k} of a {kind} query")
        rows.append((kind, modality, len(values), encode_ms, faiss_ms, numpy_ms, total_ms))
        ratio = statistics.median(faiss_ms) / statistics.median(numpy_ms)
        summary.append(f"search {kind}: p95 {percentile(total_ms, 95):.1f} ms end to end; faiss / numpy = "
                       f"{ratio:.2f} (search only, p50 {statistics.median(faiss_ms):.2f} vs "
                       f"{statistics.median(numpy_ms):.2f} ms)")

    print(f"\n| query → searched | queries | encode p50 / p95 (ms) | faiss exact p50 / p95 (ms) | numpy p50 / p95 (ms) "
          f"| end to end p50 / p95 (ms) |")
    print("|---|---|---|---|---|---|")
    for kind, modality, count, encode_ms, faiss_ms, numpy_ms, total_ms in rows:
        cells = [f"{statistics.median(v):.2f} / {percentile(v, 95):.2f}" for v in (encode_ms, faiss_ms, numpy_ms, total_ms)]
        print(f"| {kind} → {modality} | {count} | " + " | ".join(cells) + " |")
    print()
    for line in summary:
        print(line)

    from trimodal.search.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_NEIGHBOURS

    rng = np.random.default_rng(1)
    for size in [int(s) for s in args.hnsw_sizes.split(",") if s]:
        vectors = padded(index, "image", size, seed=2)
        sample = rng.standard_normal((args.queries, vectors.shape[1])).astype(np.float32)
        sample /= np.linalg.norm(sample, axis=1, keepdims=True)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.add(vectors)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        built = time.perf_counter() - started
        k = min(args.k, size)
        exact_ms, approx_ms, recalls = [], [], []
        for query in sample:
            t0 = time.perf_counter()
            _, truth = flat.search(query.reshape(1, -1), k)
            t1 = time.perf_counter()
            _, found = hnsw.search(query.reshape(1, -1), k)
            t2 = time.perf_counter()
            exact_ms.append(1e3 * (t1 - t0))
            approx_ms.append(1e3 * (t2 - t1))
            recalls.append(len(set(truth[0]) & set(found[0])) / k)
        print(f"hnsw {size}: recall@10 {np.mean(recalls):.3f}, search p50 {statistics.median(approx_ms):.3f} ms "
              f"(exact {statistics.median(exact_ms):.3f} ms), built in {built:.1f} s")


if __name__ == "__main__":
    main()
