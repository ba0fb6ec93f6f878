"""`mm export RUN --format onnx`: each encoder of a trained run as an ONNX graph, checked against torch.

One graph per modality the run encodes, `Family.encode` of that modality and nothing else: it reads what a
collated batch holds for it (the store's features: an image vector or patch tokens; caption token ids, with
a text tower's states or embedding where the run reads them; log-mel or speech-tower frames with their
mask) and returns the unit-length latents `mm index` indexes. Batch and sequence lengths are dynamic. The
graphs come from torch.export (`torch.onnx.export(dynamo=True)`, the maintained exporter), from the model as
inference computes it: a layer whose inference form differs from its training form offers `exported()`
(BitLinear: its int8 ternary codes and scale, 8-bit activations), and data-dependent trims of padding are
skipped while exporting (`trimodal.features.towers.exporting`). What a family cannot export (test-time
training, a decoder's memory write) is listed in the manifest, one line each (`Family.export_limits`).

Every graph is checked before the manifest is written: onnxruntime against torch on rows of the run's split
(several batch sizes and lengths), max |Δ| at most `TOLERANCE` (fp32). OUT holds:

    <modality>.onnx     the graph: inputs named as the batch keys, output `latent` (batch, latent_dim)
    export.json         run, checkpoint and its sha256, family, per modality the file, its inputs (name,
                        dtype, shape with named dynamic axes), output and the preprocessing they expect
                        (the feature store's record of its featurizer), the parity measured, what is not
                        exported; written last
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.image import file_sha256
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, location, prepare_folder, storage_errors, write_bytes

FORMAT = "trimodal-onnx/1"
MANIFEST = "export.json"
OUTPUT = "latent"
FORMATS = ("onnx",)
TOLERANCE = 1e-4  # max |Δ| of a latent, fp32 (HF's CLIPOnnxConfig validates at the same)
# A graph with 8-bit activations (BitLinear) may differ by rounding flips (`check_parity`): at most this share
# of rows beyond TOLERANCE, none by more than FLIP_DIFF.
FLIP_ROWS = 0.1
FLIP_DIFF = 1e-2
PARITY_ROWS = 256  # rows of each modality of the split the graph is checked on
PARITY_BATCH = 32
EXAMPLE_ROWS = 4  # the batch the graph is traced with (a batch of 1 would fix the batch size)
NOT_INPUTS = ("keys", "caption_id")  # batch entries that are not the encoders' inputs
# The inputs with a dynamic sequence axis (axis 1), and what it is called in export.json (axis 0, dynamic
# for every input, is "batch").
AXES = {"text": "text_length", "text_states": "text_length", "audio": "frames", "audio_mask": "frames",
        "image_tokens": "image_tokens"}


@dataclass(frozen=True)
class ExportOptions:
    format: str = "onnx"
    checkpoint: str = "best"
    split: str = "test"  # the rows the graphs are checked on
    shards: str | None = None  # default: the run's
    features: str | None = None  # default: the run's


def export_run(run: str, out: str, options: ExportOptions = ExportOptions(), *, reporter: Reporter = SILENT) -> dict:
    """Export every encoder of `run` into `out`; returns export.json's content. See the module doc."""
    from trimodal.training.data import load_split, open_sources
    from trimodal.training.eval_run import load_run, read_resolved_config
    from trimodal.training.run_storage import RunFolder
    from trimodal.training.settings import TrainConfig
    from trimodal.training.trainer import CHECKPOINTS, max_audio_frames

    if options.format not in FORMATS:
        raise ConfigError(f"--format must be {' or '.join(FORMATS)} (got {options.format!r})")
    if options.checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last (got {options.checkpoint!r})")
    out = location(out)
    folder = RunFolder(run)
    checkpoint_name = f"{CHECKPOINTS}/{options.checkpoint}.safetensors"
    folder.fetch(["config.resolved.toml", checkpoint_name])
    resolved = read_resolved_config(folder.local)
    sources = open_sources(options.shards or resolved["data"]["shards"],
                           options.features or resolved["data"]["features"], [options.split])
    sources.check(options.split)
    model, _, _ = load_run(folder.local, options.checkpoint, "cpu")
    train = resolved["train"]
    frames = max_audio_frames(TrainConfig(max_audio_seconds=float(train["max_audio_seconds"])), sources.store.config)
    with reporter.task(f"read {options.split}", total=None, unit="shards") as task:
        data = load_split(sources, options.split, train["modalities"], frames, model.store_inputs())
        task.update(total=1, completed=1)
    with storage_errors(f"writing the export {out}"):
        prepare_folder(out)
        (out / MANIFEST).unlink(missing_ok=True)  # what follows replaces it: nothing may look complete
    graphs = {}
    for modality in [m for m in ("image", "text", "audio") if m in train["modalities"]]:
        batches = parity_batches(data, modality)
        if not batches:
            continue
        with reporter.task(f"export {modality}", total=2, unit="steps") as task:
            graph, inputs, quantised = export_graph(model, modality, batches[0])
            task.advance(1)
            parity = check_parity(model, modality, graph, batches, quantised=quantised)
            task.advance(1)
        with storage_errors(f"writing {out / f'{modality}.onnx'}"):
            write_bytes(out / f"{modality}.onnx", graph)
        graphs[modality] = {"file": f"{modality}.onnx", "inputs": inputs,
                            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", int(parity.pop("dim"))]},
                            "preprocessing": preprocessing(modality, sources.store.config, model.store_inputs()),
                            "parity": parity}
    if not graphs:
        raise TrimodalError(f"split {options.split!r} of {sources.shards} has nothing the run encodes: nothing to export")
    manifest = {
        "format": FORMAT, "created_with": f"trimodal {__version__}", "opset": _opset(graph),
        "onnxruntime_checked": _onnxruntime_version(), "torch": torch.__version__,
        "run": str(folder.target), "checkpoint": options.checkpoint,
        "checkpoint_sha256": file_sha256(folder.local / checkpoint_name), "family": resolved["model"]["name"],
        "store_config": sources.store.config, "inputs": {**{"image": "embedding", "text": "ids"}, **model.store_inputs()},
        "text_spec": sources.text_spec, "max_audio_frames": frames, "encoders": graphs,
        "not_exported": model.export_limits(),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def parity_batches(data, modality: str) -> list[dict]:
    """Collated batches of up to `PARITY_ROWS` rows of `modality` (utterances of several lengths), the first
    `EXAMPLE_ROWS` rows on their own: the batch the graph is traced with."""
    from trimodal.training.data import collate

    values = {"image": data.images, "text": data.tokens, "audio": data.mels}[modality]
    if values is None or len(values) == 0:
        return []
    rows = np.linspace(0, len(values) - 1, min(PARITY_ROWS, len(values))).round().astype(int).tolist()
    if modality == "audio":  # batched by length, as `mm index` batches them; the example is the longest
        rows = sorted(set(rows), key=lambda i: -len(values[i]))
    groups = [rows[:EXAMPLE_ROWS]] + [rows[s : s + PARITY_BATCH] for s in range(EXAMPLE_ROWS, len(rows), PARITY_BATCH)]
    return [collate([data.item(modality, i) for i in group], [modality]) for group in groups if group]


class EncoderGraph(torch.nn.Module):
    """`model.encode(modality, ·)` with the batch's tensors as positional inputs (what torch.export traces)."""

    def __init__(self, model, modality: str, names: list[str]):
        super().__init__()
        self.model, self.modality, self.names = model, modality, names

    def forward(self, *tensors):
        return self.model.encode(self.modality, dict(zip(self.names, tensors)))


def export_graph(model, modality: str, example: dict) -> tuple[bytes, list[dict], bool]:
    """(the ONNX graph of `model.encode(modality, ·)` as bytes, its inputs' descriptions, whether it
    quantises activations), traced with `example` (a collated batch) with dynamic batch and sequence axes."""
    from torch.export import Dim

    names = [name for name, value in example.items()
             if torch.is_tensor(value) and name not in NOT_INPUTS and not name.endswith("_present")]
    tensors = tuple(example[name] for name in names)
    dynamic = tuple({0: Dim.DYNAMIC, **({1: Dim.DYNAMIC} if name in AXES else {})} for name in names)
    inference = inference_form(model)
    quantised = any(getattr(module, "quantises_activations", False) for module in inference.modules())
    graph = EncoderGraph(inference, modality, names).eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel is not an ONNX op; the plain path is
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(graph, tensors, input_names=names, output_names=[OUTPUT],
                                        dynamic_shapes=(dynamic,), dynamo=True, external_data=False, verbose=False)
    except Exception as error:  # torch.export's and the ONNX translation's errors have no common base
        raise TrimodalError(f"the {modality} encoder of this {type(model).__name__} could not be exported to "
                            f"ONNX: {_summary(error)}") from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    data = program.model_proto.SerializeToString()
    described = [{"name": name, "dtype": str(value.dtype).removeprefix("torch."),
                  "shape": ["batch" if axis == 0 else AXES[name] if axis == 1 and name in AXES else int(size)
                            for axis, size in enumerate(value.shape)]}
                 for name, value in zip(names, tensors)]
    return data, described, quantised


@contextmanager
def quiet_exporter():
    """torch.onnx's and onnxscript's warnings and log lines (progress notes, constant folding skipped) kept
    off the terminal: library code prints nothing, and what matters is checked (`check_parity`)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _summary(error: Exception) -> str:
    """One line of an exporter's error: its exception summary where it has one (torch.export's do)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in text:
        after = text.split("## Exception summary", 1)[1]
        lines = [line.strip() for line in after.splitlines() if line.strip()] or lines
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def inference_form(model):
    """A copy of `model` in eval mode with every layer that offers `exported()` replaced by what it returns."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if name and callable(getattr(module, "exported", None)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.exported())
    return model.requires_grad_(False)


def check_parity(model, modality: str, graph: bytes, batches: list[dict], *, quantised: bool = False) -> dict:
    """How the graph run by onnxruntime differs from `model.encode` on `batches`: {"rows", "batches",
    "max_abs_diff", "rows_beyond_tolerance", "tolerance", "dim"}. A TrimodalError when a row differs by more
    than `TOLERANCE`; for a `quantised` graph (8-bit activations) only past `FLIP_ROWS` of the rows or
    `FLIP_DIFF`: an activation within float rounding of a level boundary rounds to either level (summation
    order differs between torch's kernels and onnxruntime's), which moves a latent by about 1e-3."""
    from trimodal.export.runtime import feeds, session

    runner = session(graph)
    names = [spec.name for spec in runner.get_inputs()]
    worst, rows, beyond, dim = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            expected = model.encode(modality, batch).float().numpy()
            (found,) = runner.run([OUTPUT], feeds(batch, names))
            differences = np.abs(found - expected).max(axis=1)
            worst = max(worst, float(differences.max()))
            beyond += int((differences > TOLERANCE).sum())
            rows, dim = rows + len(expected), expected.shape[1]
    failed = (beyond > FLIP_ROWS * rows or not worst <= FLIP_DIFF) if quantised else not worst <= TOLERANCE
    if failed:
        raise TrimodalError(f"the exported {modality} encoder differs from torch by up to {worst:.3g} ({beyond} of "
                            f"{rows} rows by more than {TOLERANCE:g}); nothing was written for it")
    return {"rows": rows, "batches": len(batches), "max_abs_diff": worst, "rows_beyond_tolerance": beyond,
            "tolerance": TOLERANCE, "quantised_activations": quantised, "dim": dim}


def preprocessing(modality: str, store_config: dict, inputs: dict) -> dict:
    """What the graph's inputs are: how the feature store made them (its own record of its featurizer)."""
    record = store_config.get({"image": "image", "text": "text", "audio": "audio"}[modality]) or {}
    if modality == "image":
        what = ("patch tokens of the image tower (B, tokens, width)" if inputs.get("image") == "tokens"
                else "the image tower's pooled embedding (B, dim)")
    elif modality == "text":
        extra = {"embedding": ", with the text tower's pooled embedding", "states": ", with the text tower's "
                 "token states (B, through the last end-of-text token, width)"}.get(inputs.get("text", "ids"), "")
        what = f"caption token ids (B, context length), 0-padded{extra}"
    else:
        what = ("log-mel frames (B, frames, bands) and their validity mask (B, frames)" if "n_mels" in record
                else "the speech tower's frames (B, frames, width) and their validity mask (B, frames)")
    return {"input": what, "featurizer": record}


def _opset(graph: bytes) -> int:
    import onnx

    model = onnx.load_from_string(graph)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def read_manifest(folder: str | StoragePath) -> dict:
    """export.json of an export folder; a TrimodalError unless it is a finished export of this format."""
    folder = location(folder)
    with storage_errors(f"reading the export {folder}"):
        path = folder / MANIFEST
        if not path.is_file():
            raise TrimodalError(f"{folder} is not a finished export (no {MANIFEST}); run `mm export RUN --format onnx`")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise TrimodalError(f"{path} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise TrimodalError(f"{path} is format {manifest.get('format')!r}, not {FORMAT}")
    return manifest
