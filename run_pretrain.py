#!/usr/bin/env python
"""Self-supervised wav2vec 2.0 pretraining on a chosen language mixture: the base of a study.

    # from scratch, an English-heavy mixture of FLEURS audio (10 h in all)
    accelerate launch run_pretrain.py --model_name_or_path configs/tiny-wav2vec2 \
        --mixture en=0.7 de=0.1 es=0.1 fr=0.1 --total_hours 10 --output_dir bases/imbalanced \
        --num_train_epochs 20 --per_device_train_batch_size 16 --learning_rate 5e-4 --bf16
    # continued from XLS-R on a balanced mixture of local recordings, one audiofolder per language
    accelerate launch run_pretrain.py --model_name_or_path facebook/wav2vec2-xls-r-300m \
        --mixture en=0.25 de=0.25 es=0.25 fr=0.25 --total_clips 20000 --data_dir /data/{language} \
        --output_dir bases/xlsr-balanced --max_steps 20000 --learning_rate 5e-5 --bf16

The objective is ``Wav2Vec2ForPreTraining``'s (contrastive + diversity loss over masked frames,
see ``utils/pretraining.py``); transcripts are not needed. The saved base (``output_dir``) loads
with ``AutoModelForCTC.from_pretrained`` (a new CTC head), so ``run_finetune.py
--model_name_or_path <output_dir>`` fine-tunes it exactly like XLS-R. ``mixture.json`` beside it
records the clips and seconds actually drawn per language.
"""

import logging
import os

from transformers import AutoConfig, AutoFeatureExtractor, Wav2Vec2ForPreTraining, set_seed

from utils.arguments import parse_arguments
from utils.errors import UsageError
from utils.layout import has_local_config_only
from utils.mixture import load_mixture_splits, parse_mixture
from utils.model import require_model
from utils.preemption import train_until_stopped
from utils.pretraining import DataCollatorForWav2Vec2Pretraining, PretrainingTrainer
from utils.runs import claim_output_dir, run_cli, run_signature, setup_logging, write_json_atomic
from utils.structure import FAMILIES, family_of
from utils.training import refuse_finished_run, remove_checkpoints_after_success, write_card_or_push

logger = logging.getLogger(__name__)


def main():
    # 1. Arguments: model, mixture, data source and every TrainingArguments flag.
    model_args, mix_args, data_args, training_args = parse_arguments("run_pretrain.py", __doc__)
    shares = parse_mixture(mix_args.mixture)
    if (mix_args.total_clips is None) == (mix_args.total_hours is None):
        raise UsageError("give exactly one of --total_clips or --total_hours")
    total = mix_args.total_clips if mix_args.total_clips is not None else mix_args.total_hours
    if total <= 0:
        raise UsageError(f"total {total}: expected a positive size")
    if data_args.language:
        raise UsageError(f"--language {data_args.language}: pretraining takes --mixture instead")
    setup_logging(training_args.should_log)
    logger.info("pretraining %s on %s", model_args.model_name_or_path, " ".join(f"{k}={v:g}" for k, v in shares.items()))

    require_model(model_args.model_name_or_path, model_args.model_revision)

    # 2. Output dir: new, or this same run (which resumes from its last checkpoint).
    signature = run_signature("run_pretrain.py", model_args, mix_args, data_args, training_args)
    last_checkpoint = claim_output_dir(training_args.output_dir, signature, training_args.process_index == 0)
    set_seed(training_args.seed)

    # 3. Model: random weights from a config, or a checkpoint whose quantiser we continue training.
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    family = family_of(config)
    if not family.ssl_pretraining:
        raise UsageError(f"{model_args.model_name_or_path} is a {family.name} model: run_pretrain.py trains the wav2vec 2.0 objective, "
                         f"expected a model of the {', '.join(f.name for f in FAMILIES.values() if f.ssl_pretraining)} family")
    if model_args.num_negatives is not None:
        config.num_negatives = model_args.num_negatives
    # The masked-frame embedding exists only when the config masks: build it with the pretraining
    # value, and give the saved base back its own value (what fine-tuning's SpecAugment reads).
    fine_tuning_mask_time_prob = config.mask_time_prob
    config.mask_time_prob = model_args.mask_time_prob
    if has_local_config_only(model_args.model_name_or_path):
        model = Wav2Vec2ForPreTraining(config)
    else:
        model, info = Wav2Vec2ForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, revision=model_args.model_revision, output_loading_info=True
        )
        lacking = sorted(k for k in info["missing_keys"] if k.startswith(("quantizer.", "project_q.", "project_hid.")))
        if lacking:
            raise UsageError(
                f"{model_args.model_name_or_path} has no quantiser ({lacking[0]} and {len(lacking) - 1} more missing): "
                "continued pretraining needs a pretrained checkpoint with one (e.g. facebook/wav2vec2-xls-r-300m), or a config dir to start from scratch"
            )
    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    feature_extractor = AutoFeatureExtractor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)

    # 4. The mixture: each language decoded and filtered once (cached), then drawn in its share.
    with training_args.main_process_first(desc="mixture"):
        splits, record = load_mixture_splits(
            data_args, shares, feature_extractor, config, min_frames=model_args.mask_time_length + 1,
            total_clips=mix_args.total_clips, total_hours=mix_args.total_hours, eval_clips=mix_args.eval_clips, seed=training_args.seed,
        )
    for code, drawn in record["drawn"]["train"].items():
        logger.info("drawn %s: %d clips, %.1f s (%.1f%% of the audio; asked %.1f%%)", code, drawn["clips"], drawn["seconds"],
                    100 * drawn["share_of_seconds"], 100 * shares[code])
    if training_args.process_index == 0:
        write_json_atomic(os.path.join(training_args.output_dir, "mixture.json"), record)

    # 5. Trainer: the collator masks and draws negatives; the Trainer normalises and logs the objective.
    collator = DataCollatorForWav2Vec2Pretraining(
        model=model, feature_extractor=feature_extractor, mask_time_prob=model_args.mask_time_prob,
        mask_time_length=model_args.mask_time_length, mask_time_min_masks=model_args.mask_time_min_masks,
        num_negatives=config.num_negatives, seed=training_args.seed,
    )
    trainer = PretrainingTrainer(
        model=model, args=training_args, data_collator=collator, train_dataset=splits["train"],
        eval_dataset=splits["validation"], processing_class=feature_extractor,
    )

    # 6. Train (resuming this run's last checkpoint; a stop signal saves and exits), save the base, evaluate it.
    refuse_finished_run(training_args, training_args.resume_from_checkpoint or last_checkpoint)
    train_result = train_until_stopped(trainer, training_args.resume_from_checkpoint or last_checkpoint)
    model.config.mask_time_prob = fine_tuning_mask_time_prob
    trainer.save_model()
    metrics = train_result.metrics | {"train_samples": len(splits["train"])}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    metrics = trainer.evaluate() | {"eval_samples": len(splits["validation"])}
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)

    # 7. Model card, and the Hub push when asked for.
    mixture_name = "-".join(f"{code}{round(100 * share)}" for code, share in shares.items())
    write_card_or_push(
        trainer,
        local_name=f"{config.model_type}-pretrained-{mixture_name}",
        evaluation=None,  # self-supervised: no transcripts scored
        source=model_args.model_name_or_path,
        source_revision=model_args.model_revision,
        tasks=None,
        tags=["wav2vec2", "pretraining", "language-tickets"],
    )
    remove_checkpoints_after_success(trainer)  # all of the above is written: they were only for resuming


if __name__ == "__main__":
    run_cli(main)
