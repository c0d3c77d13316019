#!/usr/bin/env python
"""The default prune scope (tensors and weights) of each supported family at its published shapes,
built on the meta device (no download, no memory): the README's family table.

    python bench/family_scopes.py

Shapes are the published configs' sizes (hidden, layers, heads, feed-forward; the conformer's
depthwise kernel); everything else is each config class's default, which does not change the scope.
"""

import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.pruning import prunable_parameters  # noqa: E402
from utils.structure import family_of  # noqa: E402

PUBLISHED = [  # (checkpoints, config class, hidden, layers, heads, feed-forward, extra)
    ("facebook/wav2vec2-base", T.Wav2Vec2Config, 768, 12, 12, 3072, {}),
    ("facebook/wav2vec2-xls-r-300m, facebook/mms-300m", T.Wav2Vec2Config, 1024, 24, 16, 4096, {"do_stable_layer_norm": True}),
    ("facebook/wav2vec2-xls-r-1b, facebook/mms-1b, facebook/mms-1b-all (adapters kept)", T.Wav2Vec2Config, 1280, 48, 16, 5120,
     {"do_stable_layer_norm": True, "adapter_attn_dim": 16}),
    ("facebook/wav2vec2-xls-r-2b", T.Wav2Vec2Config, 1920, 48, 16, 7680, {"do_stable_layer_norm": True}),
    ("utter-project/mHuBERT-147, facebook/hubert-base-ls960", T.HubertConfig, 768, 12, 12, 3072, {}),
    ("facebook/hubert-large-ll60k", T.HubertConfig, 1024, 24, 16, 4096, {"do_stable_layer_norm": True}),
    ("microsoft/wavlm-base-plus", T.WavLMConfig, 768, 12, 12, 3072, {}),
    ("microsoft/wavlm-large", T.WavLMConfig, 1024, 24, 16, 4096, {"do_stable_layer_norm": True}),
    ("facebook/data2vec-audio-base", T.Data2VecAudioConfig, 768, 12, 12, 3072, {}),
    ("facebook/data2vec-audio-large", T.Data2VecAudioConfig, 1024, 24, 16, 4096, {}),
    ("facebook/w2v-bert-2.0", T.Wav2Vec2BertConfig, 1024, 24, 16, 4096, {"conv_depthwise_kernel_size": 31}),
]


def main():
    print("| family (model_type) | published checkpoints | layers x hidden (ffn) | default-scope tensors | default-scope weights | all weights |")
    print("|---|---|---|---:|---:|---:|")
    for checkpoints, config_class, hidden, layers, heads, ffn, extra in PUBLISHED:
        config = config_class(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, vocab_size=40, **extra)
        with torch.device("meta"):
            model = T.AutoModelForCTC.from_config(config)
        scope = prunable_parameters(model)
        total = sum(p.numel() for p in model.parameters())
        print(f"| {family_of(config).name} ({config.model_type}) | {checkpoints} | {layers} x {hidden} ({ffn}) | {len(scope)} | "
              f"{sum(p.numel() for p in scope.values()):,} | {total / 1e6:,.0f}M |")


if __name__ == "__main__":
    main()
