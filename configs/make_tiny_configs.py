#!/usr/bin/env python
"""Write configs/tiny-<family>: the sizes of configs/tiny-wav2vec2 (hidden 128, 2 layers, conv 32
channels) in each other family's own config class, with its feature extractor; the tests run
every family end to end on them.

    python configs/make_tiny_configs.py
"""

import json
from pathlib import Path

import transformers as T

root = Path(__file__).resolve().parent
base = json.loads((root / "tiny-wav2vec2" / "config.json").read_text())
dims = dict(hidden_size=base["hidden_size"], num_hidden_layers=base["num_hidden_layers"], num_attention_heads=base["num_attention_heads"],
            intermediate_size=base["intermediate_size"], vocab_size=base["vocab_size"], pad_token_id=0,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
            mask_time_prob=0.0, ctc_loss_reduction="mean", ctc_zero_infinity=True)
raw = dict(conv_dim=base["conv_dim"], conv_kernel=base["conv_kernel"], conv_stride=base["conv_stride"], feat_extract_norm="layer",
           num_conv_pos_embeddings=base["num_conv_pos_embeddings"], num_conv_pos_embedding_groups=base["num_conv_pos_embedding_groups"])
fe_raw = json.loads((root / "tiny-wav2vec2" / "preprocessor_config.json").read_text())
for name, cfg in {
    "tiny-hubert": T.HubertConfig(**dims, **raw, do_stable_layer_norm=True),
    "tiny-wavlm": T.WavLMConfig(**dims, **raw, do_stable_layer_norm=True, num_buckets=32, max_bucket_distance=80),
    "tiny-data2vec-audio": T.Data2VecAudioConfig(**dims, **({k: v for k, v in raw.items() if k != "feat_extract_norm"} | {"num_conv_pos_embeddings": 5}), conv_pos_kernel_size=5),
    "tiny-w2v-bert": T.Wav2Vec2BertConfig(**dims, conv_depthwise_kernel_size=15, add_adapter=False, position_embeddings_type="relative_key", left_max_position_embeddings=32, right_max_position_embeddings=8),
}.items():
    out = root / name
    out.mkdir(exist_ok=True)
    cfg.save_pretrained(out)
    if name == "tiny-w2v-bert":
        T.SeamlessM4TFeatureExtractor().save_pretrained(out)
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(fe_raw, indent=2) + "\n")
    print(name, sum(p.numel() for p in T.AutoModelForCTC.from_config(cfg).parameters()))
