"""A run's encoders on onnxruntime alone, from the graphs `mm export --format onnx` wrote.

`OnnxEncoders` answers `encode(modality, batch)` as `Family.encode` does, from the same collated batches,
so `mm index --onnx` and `mm search --onnx` feed it exactly what they feed the torch model; no model is
built and no checkpoint read. onnxruntime's CUDA provider is used when the installed onnxruntime has it
(onnxruntime-gpu), its CPU provider otherwise.
"""

from __future__ import annotations

import numpy as np

from trimodal.errors import ConfigError, TrimodalError
from trimodal.export.graphs import OUTPUT, read_manifest
from trimodal.storage import StoragePath, location, storage_errors

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def session(graph: bytes):
    """An onnxruntime session over a serialised graph, on the best provider installed."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in PREFERRED_PROVIDERS if p in available] or available
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    return onnxruntime.InferenceSession(graph, sess_options=options, providers=providers)


def feeds(batch: dict, names: list[str]) -> dict[str, np.ndarray]:
    """The graph's inputs `names` from a collated batch (tensors on any device, or arrays)."""
    import torch

    missing = [name for name in names if name not in batch]
    if missing:
        raise ConfigError(f"the batch has no {', '.join(missing)} (the exported graph's inputs: {', '.join(names)})")
    return {name: batch[name].detach().cpu().numpy() if torch.is_tensor(batch[name]) else np.asarray(batch[name])
            for name in names}


class OnnxEncoders:
    """The encoders of an export folder: `encode(modality, batch)` -> unit-length latents (B, D), as torch."""

    def __init__(self, folder: str | StoragePath):
        self.folder = location(folder)
        self.manifest = read_manifest(self.folder)
        self._sessions: dict = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["encoders"])

    @property
    def generates_captions(self) -> bool:
        return False  # caption generation is never exported (`Family.export_limits`)

    def eval(self):
        """Nothing to switch (what `embed_split` calls on a model)."""
        return self

    def session(self, modality: str):
        if modality not in self.manifest["encoders"]:
            raise ConfigError(f"{self.folder} has no {modality} encoder (it exports {', '.join(self.modalities)})")
        if modality not in self._sessions:
            path = self.folder / self.manifest["encoders"][modality]["file"]
            with storage_errors(f"reading {path}"):
                graph = path.read_bytes()
            try:
                self._sessions[modality] = session(graph)
            except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException
                raise TrimodalError(f"{path} is not a graph onnxruntime can run ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
        return self._sessions[modality]

    def encode(self, modality: str, batch: dict):
        """(B, D) float32 torch tensor: the latents of `modality` of a collated batch."""
        import torch

        runner = self.session(modality)
        (latents,) = runner.run([OUTPUT], feeds(batch, [spec.name for spec in runner.get_inputs()]))
        return torch.from_numpy(latents)

    def check_matches(self, manifest: dict, what: str) -> None:
        """A ConfigError unless this export is of the run and checkpoint `manifest` (a search index's) records."""
        mine, theirs = self.manifest.get("checkpoint_sha256"), manifest.get("checkpoint_sha256")
        if mine != theirs:
            raise ConfigError(f"the export {self.folder} is of {self.manifest.get('run')} "
                              f"({self.manifest.get('checkpoint')} checkpoint {str(mine)[:12]}), not of the run "
                              f"{what} was made with ({manifest.get('run')}, {manifest.get('checkpoint')} "
                              f"checkpoint {str(theirs)[:12]})")
