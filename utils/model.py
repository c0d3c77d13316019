"""The CTC model: loading a checkpoint of a supported family (or a bare config) with a head sized
to a vocabulary."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, PreTrainedModel, Wav2Vec2Processor

from .arguments import ModelArguments
from .errors import MissingInput
from .hub_client import checkpoint_file
from .layout import has_local_config_only
from .runs import replace_dir_atomic
from .structure import family_of

logger = logging.getLogger(__name__)

def require_model(reference: str, revision: str = "main") -> None:
    """Refuses, in one line and before anything is written, a model that is neither a local folder
    nor a Hub repo this machine can read (transformers says so with an ``OSError`` traceback)."""
    try:
        AutoConfig.from_pretrained(reference, revision=revision)
    except OSError as err:
        reason = " ".join(str(err).split())
        raise MissingInput(f"cannot load the model {reference!r}: {reason} Expected a local folder holding config.json, or a Hub "
                           "model repo id this machine can read (HF_ENDPOINT, HF_HUB_OFFLINE, `hf auth login` for private repos)") from None


def load_feature_extractor(args: ModelArguments):
    return AutoFeatureExtractor.from_pretrained(args.model_name_or_path, revision=args.model_revision)


def load_ctc_model(args: ModelArguments, processor: Wav2Vec2Processor, new_head: bool = False) -> PreTrainedModel:
    """``AutoModelForCTC`` with its head sized to ``processor``'s vocabulary (a new head when the
    checkpoint's differs in size or is missing, or when ``new_head``: same size, other letters)
    and the overrides of ``args`` applied to the config."""
    config = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.model_revision)
    family = family_of(config)  # an unsupported family is refused before any weights load
    overrides = {
        name: getattr(args, name)
        for name in ("attention_dropout", "activation_dropout", "hidden_dropout", "feat_proj_dropout", "final_dropout", "mask_time_prob", "layerdrop")
        if getattr(args, name) is not None
    }
    overrides |= {
        "ctc_loss_reduction": args.ctc_loss_reduction,
        "ctc_zero_infinity": args.ctc_zero_infinity,
        "pad_token_id": processor.tokenizer.pad_token_id,
        "vocab_size": len(processor.tokenizer),
    }
    config.update(overrides)
    if has_local_config_only(args.model_name_or_path):
        logger.warning("%s holds no weights: initialising the model randomly from its config", args.model_name_or_path)
        model = AutoModelForCTC.from_config(config)
    else:
        model = AutoModelForCTC.from_pretrained(
            args.model_name_or_path, config=config, revision=args.model_revision, ignore_mismatched_sizes=True
        )
    if new_head:
        head = model.get_submodule(family.head)
        torch.nn.init.normal_(head.weight, std=config.initializer_range)
        torch.nn.init.zeros_(head.bias)
    if args.freeze_feature_encoder and family.feature_encoder:
        model.freeze_feature_encoder()
    return model


def init_from_config(config_dir: str, output_dir: str, seed: int = 0) -> None:
    """Save a seeded random initialisation of a config-only model directory (with its feature
    extractor): the 'base model' of a study run on a tiny model with no pretrained weights."""
    from transformers import set_seed

    set_seed(seed)
    model = AutoModelForCTC.from_config(AutoConfig.from_pretrained(config_dir))
    tmp = f"{output_dir.rstrip('/')}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    AutoFeatureExtractor.from_pretrained(config_dir).save_pretrained(tmp)
    replace_dir_atomic(tmp, output_dir)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a seeded random initialisation of a config-only model directory.")
    parser.add_argument("--init_from_config", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    init_from_config(cli.init_from_config, cli.output_dir, cli.seed)


def checkpoint_vocab(path_or_repo: str, revision: str = "main") -> Optional[dict]:
    """The ``vocab.json`` a checkpoint's tokenizer uses, or None if it has none (a base model)."""
    import json

    try:
        path = checkpoint_file(path_or_repo, revision, "vocab.json")
    except Exception:  # offline, or the Hub out of reach: no vocabulary to compare
        return None
    return json.loads(path.read_text(encoding="utf-8")) if path else None  # base models have none
