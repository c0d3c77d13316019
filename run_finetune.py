#!/usr/bin/env python
"""Fine-tune a wav2vec2/XLS-R model with CTC on one language: the paper's upstream step.

    accelerate launch run_finetune.py --language en \
        --model_name_or_path facebook/wav2vec2-xls-r-300m --output_dir models/xlsr-en \
        --num_train_epochs 100 --per_device_train_batch_size 16 --learning_rate 3e-4 --bf16

Reads like the Hugging Face CTC example, for transformers 5. Every ``TrainingArguments`` flag
passes through; the defaults evaluate and save each epoch and keep the checkpoint with the
lowest eval CTC loss, as the paper does.

With ``--parp_sparsity 0.8`` it finds a ticket by PARP (Lai et al. 2021) instead: the start model
is pruned to 80% by global magnitude, fine-tuned with the pruned weights zeroed but trainable,
and re-pruned to exactly 80% every ``--reprune_steps`` optimizer steps and once at the end; the
output dir is then a ticket (``mask.safetensors`` with ``method: parp``) that run_transfer.py,
run_iou.py and ``Mask.load`` take as they take run_prune.py's.
"""

import logging

from pathlib import Path

from transformers import set_seed

from utils.arguments import parse_arguments
from utils.data import build_processor, dataset_reference, load_language_splits
from utils.errors import UsageError
from utils.hub import CardEvaluation
from utils.features import DataCollatorCTCWithPadding, vectorize_splits
from utils.languages import resolve_language
from utils.layout import MASK_FILE, has_local_config_only
from utils.masks import Mask
from utils.model import checkpoint_vocab, load_ctc_model, load_feature_extractor, require_model
from utils.pruning import apply_mask, compute_masks, prunable_parameters
from utils.runs import claim_output_dir, run_cli, run_signature, setup_logging
from utils.structure import PRUNE_SCOPES, check_sparsity
from utils.tickets import PruneSpec, mask_info
from utils.training import CTCTrainer, RepruneCallback, remove_checkpoints_after_success, train_and_evaluate, write_card_or_push

logger = logging.getLogger(__name__)


def main():
    # 1. Arguments: PARP, model, data and every TrainingArguments flag (or one JSON file holding them).
    parp_args, model_args, data_args, training_args = parse_arguments("run_finetune.py", __doc__)
    if not data_args.language:
        raise UsageError("--language is required: a language code such as en, ca or ast")
    language = resolve_language(data_args.language)
    parp = parp_args.parp_sparsity is not None
    if parp:
        check_sparsity(parp_args.parp_sparsity)
        if parp_args.parp_scope not in PRUNE_SCOPES:
            raise UsageError(f"unknown --parp_scope {parp_args.parp_scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
        if parp_args.reprune_steps < 1:
            raise UsageError(f"--reprune_steps {parp_args.reprune_steps}: expected a number of optimizer steps, 1 or more")
        if has_local_config_only(model_args.model_name_or_path):
            raise UsageError(f"PARP prunes the start model's trained weights, but {model_args.model_name_or_path!r} holds only a config (random weights): "
                             "expected a pretrained or fine-tuned model")
        if not training_args.do_train:
            raise UsageError("PARP finds its ticket by training: --do_train False leaves nothing to re-prune")
    setup_logging(training_args.should_log)
    logger.info("fine-tuning %s on %s (%s)%s", model_args.model_name_or_path, language.name, language.code,
                f", PARP at {parp_args.parp_sparsity:.2f} sparsity" if parp else "")

    # 2. The output dir must be new or hold this same run (every result-changing setting equal),
    #    which then resumes from its last checkpoint.
    require_model(model_args.model_name_or_path, model_args.model_revision)
    data_args.language = language.code
    source = model_args.model_name_or_path
    signature = run_signature("run_finetune.py", *([parp_args] if parp else []), model_args, data_args, training_args)
    last_checkpoint = claim_output_dir(training_args.output_dir, signature, training_args.process_index == 0)
    set_seed(training_args.seed)

    # 3. The three splits, normalised, and the character vocabulary of the training split only.
    with training_args.main_process_first(desc="load data"):
        raw, vocab = load_language_splits(data_args, language)

    # 4. Processor (written to output_dir) and model with a CTC head for this vocabulary (a new one
    #    unless the checkpoint was trained on exactly these letters).
    source_vocab = checkpoint_vocab(model_args.model_name_or_path, model_args.model_revision)
    with training_args.main_process_first(desc="processor"):
        processor = build_processor(vocab, load_feature_extractor(model_args), training_args.output_dir)
    model = load_ctc_model(model_args, processor, new_head=source_vocab is not None and source_vocab != vocab)

    # 5. Audio to input_values, text to labels; skip (and count) what cannot be trained on.
    with training_args.main_process_first(desc="features"):
        splits = vectorize_splits(raw, processor, model.config, data_args)

    # 6. PARP: the start model's magnitude mask at the target sparsity, applied; the pruned weights
    #    stay trainable and a callback re-prunes every --reprune_steps steps and at the end.
    callbacks = []
    if parp:
        sparsity = parp_args.parp_sparsity
        mask = compute_masks(prunable_parameters(model, parp_args.parp_scope), [sparsity])[sparsity]
        apply_mask(model, mask)
        reprune = RepruneCallback(mask, sparsity, parp_args.reprune_steps)
        callbacks.append(reprune)

    # 7. Trainer: padding collator; CER/WER of greedy transcripts against each split's own text.
    trainer = CTCTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorCTCWithPadding(processor),
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=processor,
        callbacks=callbacks,
    )

    # 8. Train (resuming this run's last checkpoint), keep the lowest-eval-loss checkpoint (with PARP:
    #    re-pruned), evaluate it (per-utterance rows in predictions_validation.jsonl and predictions_test.jsonl).
    results = train_and_evaluate(trainer, splits, last_checkpoint)

    # 9. With PARP, the mask of the final re-prune makes the output dir a ticket.
    if parp and training_args.process_index == 0:
        spec = PruneSpec(scope=parp_args.parp_scope, method="parp", seed=training_args.seed)
        info = mask_info(spec, language.code, source, model_args.model_revision, model.config.model_type)
        Mask.save(Path(training_args.output_dir) / MASK_FILE, reprune.mask,
                  info | {"sparsity": sparsity, "reprune_steps": parp_args.reprune_steps, "reprunes": len(reprune.reprunes)})

    # 10. Model card, and the Hub push when asked for.
    test_data = dataset_reference(data_args, language)
    write_card_or_push(
        trainer,
        local_name=f"{model.config.model_type}-ctc-{language.code}",
        evaluation=CardEvaluation(test_data, results["test_cer"], results["test_wer"], results["test_samples"]),
        source=source,
        source_revision=model_args.model_revision,
        language=language.code,
        dataset=test_data.name,
        tags=["ctc", "language-tickets"] + (["pruned", "lottery-ticket", "parp"] if parp else []),
    )
    remove_checkpoints_after_success(trainer)  # all of the above is written: they were only for resuming


if __name__ == "__main__":
    run_cli(main)
