"""`mm index RUN [--split test] [--out DIR]` and `mm search INDEX (--text|--image|--audio) [--in M] [-k 10]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trimodal.cli.console import Device, console, reporter, say


def index(
    run: Annotated[str, typer.Argument(help="A run folder written by `mm train` (or its URL).")],
    split: Annotated[str, typer.Option("--split", help="Split whose images, captions and utterances to index.")] = "test",
    out: Annotated[str | None, typer.Option("--out", help="Index folder (default: RUN/index-SPLIT).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    approximate: Annotated[bool | None, typer.Option("--approximate/--exact", help=(
        "HNSW, or exact inner product (default: exact up to 250,000 rows per modality, HNSW past it); HNSW's "
        "recall@10 against the exact index is measured and recorded."), show_default=False)] = None,
    shards: Annotated[str | None, typer.Option("--shards", help="Shards (default: the run's).")] = None,
    features: Annotated[str | None, typer.Option("--features", help="Feature store (default: the run's).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Rows encoded at once "
                                                   "(default: the run's eval_batch_size).")] = None,
    onnx: Annotated[str | None, typer.Option("--onnx", help="An `mm export --format onnx` folder of the run: "
                                             "encode on onnxruntime alone.")] = None,
    device: Device = "auto",
) -> None:
    """Embed every image, caption and utterance of a split with the run's encoders (from the feature store)
    and write one FAISS index per modality, for `mm search`.

    Example: mm index runs/mmn --split test
    Example: mm index runs/mmn --onnx runs/mmn/onnx   (after mm export runs/mmn --out runs/mmn/onnx)
    """
    from trimodal.search.index import IndexOptions, build_index

    options = IndexOptions(split=split, checkpoint=checkpoint, shards=shards, features=features,
                           approximate=approximate, device=device, batch_size=batch_size,
                           onnx=onnx)
    with reporter() as progress:
        manifest = build_index(run, out, options, reporter=progress)
    table = Table(title=f"{manifest['run']} ({manifest['checkpoint']}), split {split}")
    for column in ("modality", "rows", "dim", "index"):
        table.add_column(column, justify="right" if column in ("rows", "dim") else "left")
    for modality, info in manifest["modalities"].items():
        kind = info["kind"] + (f", recall@10 {info['recall_at_10_vs_exact']:.3f} vs exact"
                               if "recall_at_10_vs_exact" in info else "")
        table.add_row(modality, f"{info['rows']:,}", str(info["dim"]), kind)
    console.print(table)
    where = out or f"{run.rstrip('/')}/index-{split}"
    say(f"{'already complete' if manifest.get('already_complete') else 'written'}: {where}  "
        f"(search it: mm search {where} --text \"…\")")


def search(
    index_path: Annotated[str, typer.Argument(metavar="INDEX", help="A folder written by `mm index`.")],
    text: Annotated[str | None, typer.Option("--text", help="A text query.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="An image file as the query.")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="A speech recording (wav, flac) as the query.")] = None,
    into: Annotated[str | None, typer.Option("--in", help="What to search: image, text or audio (default: images "
                                             "for text and audio queries, captions for image queries).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Results to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per result instead of a table.")] = False,
    caption: Annotated[bool, typer.Option("--caption", help="With --image, for a captioning run (bitmar): also "
                                          "the run's generated caption of the image.")] = False,
    onnx: Annotated[str | None, typer.Option("--onnx", help="An `mm export --format onnx` folder of the run: "
                                             "encode on onnxruntime alone.")] = None,
    device: Device = "auto",
) -> None:
    """Search a run's space with a text, image or audio query, in any modality.

    Example: mm search runs/mmn/index-test --text "a dog runs on the beach" -k 5
    Example: mm search runs/mmn/index-test --audio query.wav --in text --json
    """
    from trimodal.errors import ConfigError, TrimodalError
    from trimodal.search.searcher import QueryEncoder, SearchIndex, check_k
    from trimodal.search.searcher import search as run_search

    given = [(kind, value) for kind, value in (("text", text), ("image", image), ("audio", audio)) if value is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one query: --text, --image or --audio")
    check_k(k)
    kind, value = given[0]
    if isinstance(value, Path):
        try:
            value = value.read_bytes()
        except OSError as error:
            raise TrimodalError(f"cannot read the --{kind} query {given[0][1]}: {error.strerror or error}") from error
    if caption and kind != "image":
        raise ConfigError("--caption goes with an --image query")
    if kind == "text" and not value.strip():
        raise ConfigError("the text query is empty")
    found = SearchIndex(index_path)
    if into is not None:
        found.check_modality(into)  # before the model is loaded
    encoder = QueryEncoder(found.manifest, device, onnx)
    results = run_search(found, encoder, kind, value, modality=into, k=k)
    generated = encoder.caption(value) if caption else None
    if as_json:
        if generated is not None:
            print(json.dumps({"generated_caption": generated}, ensure_ascii=False))
        for result in results:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    searched = results[0].modality if results else into
    table = Table(title=f"{kind} query → {searched} of {found.manifest['split']} ({found.manifest['family']})")
    for column in ("rank", "score", "key", "caption"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for result in results:
        table.add_row(str(result.rank), f"{result.score:.4f}", escape(result.key), escape(result.caption))
    console.print(table)
    if generated is not None:
        say(f"generated caption: {generated}")


def serve(
    index_path: Annotated[str, typer.Argument(metavar="INDEX", help="A folder written by `mm index`.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 127.0.0.1 (the default) is this "
                                      "machine only; 0.0.0.0 exposes the page to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.01, help="Largest image or audio upload "
                                                 "accepted (MB).")] = 10.0,
    onnx: Annotated[str | None, typer.Option("--onnx", help="An `mm export --format onnx` folder of the run: "
                                             "encode on onnxruntime alone.")] = None,
    device: Device = "auto",
) -> None:
    """A search page (text, image, speech: typed, uploaded or recorded) and its JSON API over an index.

    Example: mm serve runs/mmn/index-test --port 8000   (then open http://127.0.0.1:8000)
    """
    import uvicorn

    from trimodal.search.searcher import QueryEncoder, SearchIndex
    from trimodal.search.server import create_app

    found = SearchIndex(index_path)
    encoder = QueryEncoder(found.manifest, device, onnx)
    app = create_app(found, encoder, max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    if host not in ("127.0.0.1", "localhost", "::1"):
        from trimodal.cli.console import warn

        warn(f"--host {host}: anyone who can reach this machine on port {port} can search the index and read its "
             "images and recordings; there is no login")
    say(f"serving {index_path} on http://{host}:{port}  (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
