"""What each supported self-supervised model family looks like: the one place a module name is
spelled (as nn_pruning's ``model_structure.py`` does for text models).

A family is found from ``config.model_type``. Its entry names, relative to the base model (the
``*ForCTC`` class's ``base_model_prefix``): the encoder layers and the module type of each weight
in them that pruning may touch, the feature projection, the front end (a conv feature encoder on
raw waveforms, kept frozen; or log-mel ``input_features`` with no conv stack), the CTC head, the
adapters that are never pruned by default, and the config fields two tickets must share to be the
same architecture. Scopes, IoU grouping, the freeze callback, the head policy, the data layer's
frame arithmetic and ticket checks all ask this table.

Published checkpoints per family (for the README's scope sizes): XLS-R 300M/1B/2B, MMS-300M/1B
and wav2vec2-base are ``wav2vec2``; mHuBERT-147 and HuBERT base/large are ``hubert``; WavLM base+/large
``wavlm``; data2vec-audio base/large ``data2vec-audio``; w2v-BERT 2.0 (600M) ``wav2vec2-bert``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from .errors import UsageError
from .layout import ONE_SHOT
from .text import SAMPLING_RATE

# Feed-forward and self-attention as wav2vec2-style encoder layers name them, in the order the
# model's ``named_parameters()`` lists them (the tie rule's order, kept when pruning from files).
_ATTENTION_FFN = {
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.q_proj": "q",
    "attention.out_proj": "out",
    "feed_forward.intermediate_dense": "ffn_in",
    "feed_forward.output_dense": "ffn_out",
}
_RAW_FRONT_END_FIELDS = ("conv_dim", "conv_kernel", "conv_stride")
_SHARED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(frozen=True)
class Family:
    """One model family's layout; module paths are relative to the base model ``base``."""

    name: str
    model_type: str  # config.model_type
    base: str  # attribute of the base model in the *ForCTC class
    modules: dict[str, str]  # path inside an encoder layer -> module type (IoU groups, default scope), in named_parameters() order
    input_name: str  # what the feature extractor produces and the model's forward takes
    feature_encoder: Optional[str]  # conv stack on raw audio (frozen by --freeze_feature_encoder); None for log-mel input
    architecture_fields: tuple[str, ...]
    adapters: tuple[str, ...] = ()  # submodule paths (regex) that are never pruned by default
    layers: str = "encoder.layers"
    projection: str = "feature_projection.projection"
    head: str = "lm_head"
    ssl_pretraining: bool = False  # run_pretrain.py's objective (Wav2Vec2ForPreTraining) exists for it

    # -- names derived from the table ----------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"{self.base}."

    @cached_property
    def layer_pattern(self) -> re.Pattern:
        """``<base>.encoder.layers.<i>.<module>.weight`` for the modules of the table: (layer, module)."""
        modules = "|".join(re.escape(m) for m in sorted(self.modules, key=len, reverse=True))
        return re.compile(rf"^{re.escape(self.prefix + self.layers)}\.(\d+)\.({modules})\.weight$")

    @property
    def projection_weight(self) -> str:
        return f"{self.prefix}{self.projection}.weight"

    @cached_property
    def conv_kernel_pattern(self) -> Optional[re.Pattern]:
        if self.feature_encoder is None:
            return None
        return re.compile(rf"^{re.escape(self.prefix + self.feature_encoder)}\.conv_layers\.\d+\.conv\.weight$")

    @property
    def feature_encoder_prefix(self) -> Optional[str]:
        return f"{self.prefix}{self.feature_encoder}." if self.feature_encoder else None

    @property
    def head_prefix(self) -> str:
        return f"{self.head}."

    def module_of(self, name: str) -> Optional[tuple[int, str]]:
        """(layer index, module type) of an in-table encoder weight, else None."""
        match = self.layer_pattern.match(name)
        return (int(match.group(1)), self.modules[match.group(2)]) if match else None

    def parameter_rank(self, name: str) -> tuple[int, ...]:
        """Sort key putting prunable weight names (encoder layers, projection, conv kernels) in the
        order the model's ``named_parameters()`` lists them, for checkpoints read without a model:
        conv feature encoder, then feature projection, then the layers, each in table order."""
        if match := self.layer_pattern.match(name):
            return (2, int(match.group(1)), list(self.modules).index(match.group(2)))
        if name == self.projection_weight:
            return (1,)
        if self.conv_kernel_pattern and self.conv_kernel_pattern.match(name):
            return (0, int(name.split(".conv_layers.")[1].split(".")[0]))
        raise ValueError(f"{name!r} is not a prunable weight of a {self.name} model")


_RAW = dict(input_name="input_values", feature_encoder="feature_extractor")
FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("wav2vec2", "wav2vec2", "wav2vec2", _ATTENTION_FFN, architecture_fields=_SHARED_FIELDS + _RAW_FRONT_END_FIELDS,
               adapters=(r"encoder\.layers\.\d+\.adapter_layer",), ssl_pretraining=True, **_RAW),  # MMS language adapters
        Family("hubert", "hubert", "hubert", _ATTENTION_FFN, architecture_fields=_SHARED_FIELDS + _RAW_FRONT_END_FIELDS, **_RAW),
        # WavLM's gated relative position bias (attention.gru_rel_pos_linear, 8 x head_dim) is not in the table: not pruned.
        Family("wavlm", "wavlm", "wavlm", _ATTENTION_FFN, architecture_fields=_SHARED_FIELDS + _RAW_FRONT_END_FIELDS, **_RAW),
        Family("data2vec-audio", "data2vec-audio", "data2vec_audio", _ATTENTION_FFN,
               architecture_fields=_SHARED_FIELDS + _RAW_FRONT_END_FIELDS, **_RAW),
        Family(
            "w2v-bert-2.0",
            "wav2vec2-bert",
            "wav2vec2_bert",
            {
                "ffn1.intermediate_dense": "ffn1_in",
                "ffn1.output_dense": "ffn1_out",
                "self_attn.linear_q": "q",
                "self_attn.linear_k": "k",
                "self_attn.linear_v": "v",
                "self_attn.linear_out": "out",
                "conv_module.pointwise_conv1": "conv_pw1",
                "conv_module.depthwise_conv": "conv_dw",
                "conv_module.pointwise_conv2": "conv_pw2",
                "ffn2.intermediate_dense": "ffn2_in",
                "ffn2.output_dense": "ffn2_out",
            },
            input_name="input_features",
            feature_encoder=None,
            architecture_fields=_SHARED_FIELDS + ("feature_projection_input_dim", "conv_depthwise_kernel_size", "add_adapter", "num_adapter_layers"),
            adapters=(r"adapter\.",),
        ),
    )
}


def family_of(config) -> Family:
    """The family of a model config (or a model: its ``config``); an unknown one is refused."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f.model_type if f.name == f.model_type else f"{f.model_type} ({f.name})" for f in FAMILIES.values())
        raise UsageError(f"model type {model_type!r} is not a supported family: expected one of {supported}")
    return FAMILIES[model_type]


def family_of_name(name: str) -> Optional[Family]:
    """The family whose base model a parameter name belongs to (masks are read without a model)."""
    return next((family for family in FAMILIES.values() if name.startswith(family.prefix)), None)


def group_of(name: str) -> tuple[Optional[int], str]:
    """(layer index, module type) of a parameter name of any family; ``None``/``other`` outside the table."""
    family = family_of_name(name)
    found = family.module_of(name) if family else None
    return found if found else (None, "other")


def architecture_differences(expected, actual) -> list[str]:
    """The architecture fields two configs disagree on (the family's, and the family itself)."""
    family = family_of(expected)
    return [f for f in family.architecture_fields if getattr(expected, f, None) != getattr(actual, f, None)]


# ---------------------------------------------------------------------------------------------
# Front-end arithmetic: how many samples a clip needs, and how many output frames it yields.

_FBANK_WINDOW, _FBANK_HOP = 400, 160  # SeamlessM4TFeatureExtractor: 25 ms / 10 ms at 16 kHz, no centring


def _adapter_frames(config, frames: int) -> int:
    """Frames after the optional adapter (``add_adapter``): raw-waveform families stride with
    1-wide kernels; w2v-BERT convolves ``adapter_kernel_size``-wide kernels padded by half."""
    if not getattr(config, "add_adapter", False):
        return frames
    kernel = 1 if family_of(config).feature_encoder else config.adapter_kernel_size
    for _ in range(config.num_adapter_layers):
        frames = max(0, (frames + 2 * (kernel // 2) - kernel) // config.adapter_stride + 1)
    return frames


def frames_for_samples(config, num_samples: int) -> int:
    """Output frames (what CTC aligns labels to) for a clip of ``num_samples`` at 16 kHz."""
    if family_of(config).feature_encoder is not None:
        for kernel, stride in zip(config.conv_kernel, config.conv_stride):
            num_samples = max(0, (num_samples - kernel) // stride + 1)
        return _adapter_frames(config, num_samples) if num_samples else 0
    fbank = 1 + (num_samples - _FBANK_WINDOW) // _FBANK_HOP if num_samples >= _FBANK_WINDOW else 0
    stacked = math.ceil(fbank / 2)  # the extractor pads to a multiple of its stride (2) and stacks pairs
    return _adapter_frames(config, stacked) if stacked else 0


def frame_hop_seconds(config) -> float:
    """Seconds between two output frames of the encoder (20 ms for every supported family)."""
    if family_of(config).feature_encoder is not None:
        return math.prod(config.conv_stride) / SAMPLING_RATE
    return 2 * _FBANK_HOP / SAMPLING_RATE  # the extractor stacks pairs of 10 ms filterbank frames


def receptive_field(config) -> int:
    """The shortest clip (samples) that yields an output frame: 400 for XLS-R. Log-mel input needs
    two 25 ms windows, since the extractor normalises each mel bin over a clip's frames."""
    if family_of(config).feature_encoder is None:
        return _FBANK_WINDOW + _FBANK_HOP
    field_, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field_ += (kernel - 1) * jump
        jump *= stride
    return field_


def front_end_key(config) -> dict:
    """The config values the frame arithmetic depends on (part of the features' cache key)."""
    family = family_of(config)
    key = {k: list(getattr(config, k)) for k in _RAW_FRONT_END_FIELDS[1:]} if family.feature_encoder else {"input": family.input_name}
    if getattr(config, "add_adapter", False):
        key |= {k: getattr(config, k) for k in ("adapter_kernel_size", "adapter_stride", "num_adapter_layers")}
    return key


def check_feature_extractor(config, extractor) -> None:
    """A model's data settings must produce what its forward takes: one line otherwise."""
    family = family_of(config)
    produced = (getattr(extractor, "model_input_names", None) or ["input_values"])[0]
    if produced != family.input_name:
        raise UsageError(
            f"the feature extractor {type(extractor).__name__} produces {produced!r}, but a {family.name} model takes {family.input_name!r}: "
            f"expected the feature extractor saved with the model ({'log-mel features' if family.input_name == 'input_features' else 'raw waveforms'})"
        )


# ---------------------------------------------------------------------------------------------
# What pruning may be asked for (checked before torch is imported)

# Named scopes, read from each family's entry in ``utils.structure``. Biases, norms, positional
# convolutions, adapters and the CTC head are never pruned.
PRUNE_SCOPES = {
    "encoder_linear": "every weight of the encoder layers' attention (q/k/v/out) and feed-forward matrices, and for conformer "
    "layers (w2v-BERT) both feed-forward blocks and the convolution module: the paper's and PARP's scope",
    "encoder_and_projection": "encoder_linear plus the feature projection",
    "encoder_projection_conv": "encoder_and_projection plus the conv feature encoder kernels (raw-waveform families; for tiny "
    "models, whose compute sits in the conv stack)",
}
PRUNE_METHODS = ("magnitude", "random")
# How a study finds a language's ticket (run_grid.py's ``methods``), and the ``method`` its mask records.
FINDING_METHODS = {
    ONE_SHOT: "one-shot global magnitude pruning of the fine-tuned model (run_prune.py; the paper's)",
    "imp": "iterative magnitude pruning with rewinding (run_imp.py)",
    "parp": "PARP: prune the start model, fine-tune with regrowth, re-prune at intervals (run_finetune.py --parp_sparsity)",
}


def method_label(method: str, language: str) -> str:
    """A ticket's label where several methods' tickets are compared (run_iou.py): ``imp:en``."""
    return f"{method}:{language}"


def split_method_label(label: str) -> tuple[str, str]:
    """``(method, language)`` of a ``method_label``; ``("", label)`` for a plain label (``base``)."""
    method, _, language = label.partition(":")
    return (method, language) if language else ("", label)


def check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 < float(sparsity) < 1.0):
        raise UsageError(f"sparsity {sparsity!r} is outside (0, 1): expected e.g. 0.7, 0.8 or 0.9")
    return float(sparsity)
