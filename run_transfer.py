#!/usr/bin/env python
"""Fine-tune a language ticket on another language with its mask held fixed: one cell of the
paper's transfer tables.

    accelerate launch run_transfer.py --upstream en --downstream ca --sparsity 0.8

finds the ``en`` ticket at 80% sparsity (``--ticket``, else ``--tickets_dir``/en/sparsity-0.80,
else the Hub repo ``--ticket_repo_pattern`` names, else pruned now from ``--upstream_model``),
fine-tunes it on Catalan (FLEURS by default) keeping every pruned weight at exactly 0, and
reports CER/WER on Catalan's test split. When upstream and downstream differ the encoder is
frozen for ``--freeze_epochs`` (1) epoch, only the new CTC head learning, then trained for
``--train_epochs`` (10) more; when they match, ``--train_epochs`` without freezing.
Writes ``results.json``, one self-describing row of the study's grid, and the per-utterance
test transcripts it was scored from, ``predictions_test.jsonl``.
"""

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from transformers import AutoConfig, set_seed

from utils import __version__
from utils.arguments import ModelArguments, parse_arguments
from utils.data import build_processor, dataset_reference, load_language_splits
from utils.errors import MissingInput, UsageError
from utils.features import DataCollatorCTCWithPadding, vectorize_splits
from utils.hub import CardEvaluation
from utils.languages import resolve_language
from utils.layout import MASK_FILE, RESULTS_FILE, sparsity_dirname
from utils.masks import Mask
from utils.model import checkpoint_vocab, load_ctc_model, load_feature_extractor, require_model
from utils.pruning import apply_mask, check_mask_fits, weights_digest
from utils.records import TransferResult
from utils.runs import claim_output_dir, run_cli, run_signature, setup_logging
from utils.structure import PRUNE_SCOPES, architecture_differences, check_sparsity, family_of
from utils.tickets import PruneSpec, find_ticket
from utils.training import CTCTrainer, FreezeEncoderCallback, HoldMaskCallback, remove_checkpoints_after_success, train_and_evaluate, write_card_or_push

logger = logging.getLogger(__name__)


def fetch_ticket(reference: str) -> Path:
    """A ticket model repo's local snapshot; a reference that is neither a directory nor a repo id is refused."""
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(reference))
    except HFValidationError:
        raise MissingInput(f"ticket {reference!r} is neither a directory nor a Hub repo id: expected a ticket directory or ORG/NAME") from None


def main():
    started = time.time()
    # 1. Arguments: transfer, model overrides, data (the downstream language) and every TrainingArguments flag.
    transfer_args, model_args, data_args, training_args = parse_arguments("run_transfer.py", __doc__)
    upstream = "base" if transfer_args.upstream == "base" else resolve_language(transfer_args.upstream).code
    downstream = resolve_language(transfer_args.downstream)
    if data_args.language and resolve_language(data_args.language).code != downstream.code:
        raise UsageError(f"--language {data_args.language!r} contradicts --downstream {transfer_args.downstream!r}: give --downstream only")
    data_args.language = downstream.code
    sparsity = check_sparsity(transfer_args.sparsity)
    if transfer_args.prune_scope not in PRUNE_SCOPES:
        raise UsageError(f"unknown --prune_scope {transfer_args.prune_scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    freeze_epochs = transfer_args.freeze_epochs if upstream != downstream.code else 0
    training_args.num_train_epochs = freeze_epochs + transfer_args.train_epochs
    if freeze_epochs and training_args.world_size > 1:
        training_args.ddp_find_unused_parameters = True  # frozen parameters produce no gradients in epoch 1
    setup_logging(training_args.should_log)
    logger.info("transferring the %s ticket at %.2f sparsity to %s (%s)", upstream, sparsity, downstream.name, downstream.code)

    # 2. The output dir must be new or hold this same run (every result-changing setting equal),
    #    which then resumes from its last checkpoint.
    if transfer_args.upstream_model:
        require_model(transfer_args.upstream_model)
    transfer_args.upstream, transfer_args.downstream, transfer_args.sparsity = upstream, downstream.code, sparsity
    signature = run_signature("run_transfer.py", transfer_args, model_args, data_args, training_args)
    last_checkpoint = claim_output_dir(training_args.output_dir, signature, training_args.process_index == 0)

    # 3. The ticket: found, fetched or pruned now (once, on the main process), and its mask.
    with training_args.main_process_first(desc="ticket"):
        if transfer_args.ticket:
            ticket_ref, found = transfer_args.ticket, "given"
        else:
            spec = PruneSpec(scope=transfer_args.prune_scope, seed=training_args.seed)
            ticket_ref, found = find_ticket(upstream, sparsity, transfer_args.tickets_dir, transfer_args.ticket_repo_pattern, transfer_args.upstream_model, spec)
        ticket_dir = Path(ticket_ref) if Path(ticket_ref).is_dir() else fetch_ticket(ticket_ref)
    if not (ticket_dir / MASK_FILE).is_file():
        raise MissingInput(f"ticket {ticket_ref!r} holds no {MASK_FILE}: expected a ticket written by run_prune.py")
    ticket_mask = Mask.load(ticket_dir)
    mask, ticket_info = ticket_mask.bools(), ticket_mask.metadata
    if abs(ticket_info["sparsity"] - sparsity) > 1e-9:
        raise UsageError(f"ticket {ticket_ref!r} has sparsity {ticket_info['sparsity']:.2f}, not the {sparsity:.2f} asked for")
    if model_args.model_name_or_path != ModelArguments.model_name_or_path:  # the user named the base the ticket must come from
        expected, actual = AutoConfig.from_pretrained(model_args.model_name_or_path), AutoConfig.from_pretrained(ticket_dir)
        differ = architecture_differences(expected, actual)
        if differ:
            raise UsageError(f"ticket {ticket_ref!r} does not match --model_name_or_path {model_args.model_name_or_path!r}: {', '.join(differ)} differ")
    logger.info("ticket %s (%s): %d of %d weights kept", ticket_ref, found, ticket_info["kept_total"], ticket_info["total"])
    set_seed(training_args.seed)

    # 4. Downstream data and vocabulary. The ticket's own vocabulary and head are kept when they
    #    cover every training letter (same language); otherwise a new head for the new letters.
    with training_args.main_process_first(desc="load data"):
        raw, vocab = load_language_splits(data_args, downstream)
    ticket_vocab = checkpoint_vocab(str(ticket_dir))
    if ticket_vocab is not None and set(vocab) <= set(ticket_vocab):
        vocab = ticket_vocab
    new_head = ticket_vocab != vocab
    model_args.model_name_or_path = str(ticket_dir)
    with training_args.main_process_first(desc="processor"):
        processor = build_processor(vocab, load_feature_extractor(model_args), training_args.output_dir)
    model = load_ctc_model(model_args, processor, new_head=new_head)
    check_mask_fits(model, mask)
    apply_mask(model, mask)

    # 5. Features, and a Trainer that holds the mask and freezes then unfreezes the encoder.
    with training_args.main_process_first(desc="features"):
        splits = vectorize_splits(raw, processor, model.config, data_args)
    callbacks = []
    if not transfer_args.dense_transfer:
        callbacks.append(HoldMaskCallback(mask))
    freezer = None
    if freeze_epochs:
        freezer = FreezeEncoderCallback(freeze_epochs, family_of(model), model_args.freeze_feature_encoder)
        callbacks.append(freezer)
    trainer = CTCTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorCTCWithPadding(processor),
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=processor,
        callbacks=callbacks,
    )

    # 6. Train (resuming this run's last checkpoint), keep the lowest-eval-loss checkpoint, test it.
    metrics = train_and_evaluate(trainer, splits, last_checkpoint)

    # 7. What the final model holds: measured sparsity, and whether every pruned weight is still 0.
    params = dict(model.named_parameters())
    pruned_zero = all(bool(torch.all(params[n].detach()[~keep.to(params[n].device)] == 0)) for n, keep in mask.items())
    nonzero = sum(int(torch.count_nonzero(params[n].detach())) for n in mask)
    digest = weights_digest(model, mask)
    print(f"rank {training_args.process_index}/{training_args.world_size}: final in-scope weights sha256 {digest}", flush=True)

    # 8. results.json: one self-describing row of the grid (main process), model card and push.
    if training_args.process_index == 0:
        results = TransferResult(
            upstream=upstream,
            downstream=downstream.code,
            sparsity=sparsity,
            ticket=ticket_ref,
            ticket_found=found,
            ticket_source_model=ticket_info.get("source_model"),
            ticket_mask_sha256=ticket_info["sha256"],
            prune_scope=ticket_info["scope"],
            prune_method=ticket_info["method"],
            dense_transfer=transfer_args.dense_transfer,
            new_head=new_head,
            test_cer=metrics["test_cer"],
            test_wer=metrics["test_wer"],
            test_samples=metrics["test_samples"],
            test_loss=metrics["test_loss"],
            eval_loss=trainer.state.best_metric if trainer.state.best_metric is not None else metrics["eval_loss"],
            eval_cer=metrics["eval_cer"],
            best_checkpoint=trainer.state.best_model_checkpoint,
            freeze_epochs=freeze_epochs,
            frozen_in_epochs=[e + 1 for e in freezer.frozen_in_epochs] if freezer else [],
            epochs=training_args.num_train_epochs,
            steps=trainer.state.global_step,
            train_samples=len(splits["train"]),
            seed=training_args.seed,
            learning_rate=training_args.learning_rate,
            per_device_train_batch_size=training_args.per_device_train_batch_size,
            world_size=training_args.world_size,
            dataset=data_args.data_dir or data_args.dataset_name,
            measured_sparsity=1.0 - nonzero / ticket_info["total"],
            mask_held=pruned_zero,
            final_weights_sha256=digest,
            wall_time_s=round(time.time() - started, 1),
            transformers_version=transformers.__version__,
            suite_version=__version__,
            command=" ".join(sys.argv),
            transfer_args=asdict(transfer_args),
        )
        results.write(Path(training_args.output_dir) / RESULTS_FILE)
        logger.info("%s -> %s at %.2f: test CER %.4f, WER %.4f", upstream, downstream.code, sparsity, results.test_cer, results.test_wer)
    test_data = dataset_reference(data_args, downstream)
    write_card_or_push(
        trainer,
        local_name=f"{upstream}-ticket-{sparsity_dirname(sparsity)}-{downstream.code}",
        evaluation=CardEvaluation(test_data, metrics["test_cer"], metrics["test_wer"], metrics["test_samples"]),
        source=ticket_ref,
        language=downstream.code,
        dataset=test_data.name,
        tags=["ctc", "language-tickets", "lottery-ticket", "pruned", f"upstream-{upstream}", sparsity_dirname(sparsity)],
    )
    remove_checkpoints_after_success(trainer)  # all of the above is written: they were only for resuming


if __name__ == "__main__":
    run_cli(main)
