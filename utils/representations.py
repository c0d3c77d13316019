"""What models compute, layer by layer: the hidden states of an encoder on a test set, and linear
CKA between two models' states (Kornblith et al., 2019, "Similarity of neural network
representations revisited"), the representational-similarity measure the paper's open question 3
names.

Layer 0 is the input to the first encoder layer (the feature projection's output, after the
positional convolution where the family adds it), layer ``i`` the output of encoder layer ``i``:
the ``hidden_states`` transformers returns. Each utterance keeps only its real frames (batch
padding is cut off with the model's own frame count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import UsageError


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` examples (``n x d1``, ``n x d2``):
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``. 1 for
    identical representations; invariant to orthogonal transforms and isotropic scaling of either."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise UsageError(f"representations of shapes {x.shape} and {y.shape}: expected (examples, features) of the same examples")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0:
        raise UsageError("a representation is constant over the examples: CKA is undefined")
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


def check_layers(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """The layers asked for (default: all, 0..``num_layers``), each one the model has."""
    if layers is None:
        return list(range(num_layers + 1))
    for layer in layers:
        if not 0 <= layer <= num_layers:
            raise UsageError(f"layer {layer} is outside the model: expected 0..{num_layers} (0 = the encoder's input, {num_layers} = its last layer)")
    return list(layers)


@dataclass
class LayerStates:
    """One model's states on one test set: per layer, the sampled frames of every utterance
    (``frames x hidden``, utterances in order) and each utterance's mean over all its frames;
    ``lengths``, each utterance's frame count (models compared on frames must agree on them)."""

    frames: dict[int, np.ndarray]
    pooled: dict[int, np.ndarray]
    lengths: list[int]
    positions: list[np.ndarray]  # which frames of each utterance ``frames`` holds


def frame_positions(length: int, per_utterance: int) -> np.ndarray:
    """Which frames of an utterance a frame-level comparison keeps: all, or ``per_utterance``
    evenly spaced ones. Depends on the length only, so every model of one architecture keeps the same."""
    if length <= per_utterance:
        return np.arange(length)
    return np.linspace(0, length - 1, per_utterance).round().astype(np.intp)


@torch.no_grad()
def layer_states(model: torch.nn.Module, feature_extractor, dataset, layers: Sequence[int], per_utterance: int, batch_size: int = 8) -> LayerStates:
    """The states of ``layers`` on every utterance of ``dataset`` (in order), batch padding cut off."""
    model.eval()
    device = next(model.parameters()).device
    name = feature_extractor.model_input_names[0]
    frames: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    means: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    lengths: list[int] = []
    positions: list[np.ndarray] = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size][name]
        batch = feature_extractor.pad([{name: row} for row in rows], padding=True, return_tensors="pt", return_attention_mask=True)
        outputs = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
        padded = outputs.hidden_states[0].shape[1]
        counts = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1)).clamp(max=padded).tolist()
        lengths.extend(counts)
        positions.extend(frame_positions(count, per_utterance) for count in counts)
        for layer in layers:
            states = outputs.hidden_states[layer].float().cpu().numpy()
            for row, count in enumerate(counts):
                frames[layer].append(states[row, positions[start + row]])
                means[layer].append(states[row, :count].mean(axis=0))
    return LayerStates({k: np.concatenate(v) for k, v in frames.items()}, {k: np.stack(v) for k, v in means.items()}, lengths, positions)
