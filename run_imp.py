#!/usr/bin/env python
"""Find a language's tickets by iterative magnitude pruning with rewinding (IMP: Frankle & Carbin
2019; Frankle et al. 2020; Audio-Lottery for speech), the lottery-ticket literature's reference
method, beside run_prune.py's one-shot pruning of a fine-tuned model.

    accelerate launch run_imp.py --language en --model_name_or_path facebook/wav2vec2-xls-r-300m \
        --sparsity 0.7 0.8 0.9 --rounds 5 --rewind_step 0 --output_dir imp/en \
        --num_train_epochs 30 --per_device_train_batch_size 16 --learning_rate 3e-4 --bf16

Round 0 fine-tunes the model densely with CTC, as run_finetune.py does. Each later round prunes,
among the weights still kept, the lowest-magnitude ones by run_prune.py's exact global threshold
and tie rule, rewinds every weight to the rewind point (the starting weights, or with
``--rewind_step k`` those after step k of round 0), and fine-tunes again with the mask held.
``--rounds`` pruning rounds: the first sparsity is reached in rounds that each prune the same
fraction of what is left, then one round per further sparsity, so each requested sparsity is hit
exactly. IMP costs ``--rounds`` + 1 fine-tunes where one-shot pruning costs one.

Each round is a folder, ``round-<r>/`` (its model, ``mask.safetensors``, results and, written
last, ``round.json``); a killed run resumes at its first unfinished round (inside it, from its
last checkpoint). Each requested sparsity is also an ordinary ticket, ``sparsity-0.80/`` (the
round's model and its mask, ``method: imp``), which run_transfer.py, run_iou.py and
``Mask.load`` take as they take run_prune.py's.
"""

import copy
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from transformers import set_seed
from transformers.utils import CONFIG_NAME

from utils import __version__
from utils.arguments import parse_arguments
from utils.data import build_processor, load_language_splits
from utils.errors import UsageError
from utils.features import DataCollatorCTCWithPadding, vectorize_splits
from utils.hub import write_ticket_card
from utils.iterative import RewindPointCallback, has_weights, imp_levels, load_weights, optimizer_steps, round_fraction, save_weights, weight_files
from utils.languages import resolve_language
from utils.layout import IMP_ROUND_FILE, MASK_FILE, imp_round_dir, rewind_dir, sparsity_dirname
from utils.masks import Mask
from utils.model import checkpoint_vocab, load_ctc_model, load_feature_extractor, require_model
from utils.pruning import apply_mask, compute_masks, prunable_parameters, weights_digest
from utils.records import ImpRound
from utils.runs import claim_output_dir, last_complete_checkpoint, remove_checkpoints, run_cli, run_signature, setup_logging
from utils.structure import PRUNE_SCOPES, check_sparsity
from utils.tickets import PruneSpec, mask_info
from utils.training import CTCTrainer, HoldMaskCallback, remove_checkpoints_after_success, train_and_evaluate

logger = logging.getLogger(__name__)


def write_ticket(round_dir: Path, out: Path, metadata: dict, processor) -> None:
    """A requested sparsity's ticket: the round's weights, config and mask (hard links where the
    file system allows), the processor and a ticket card, staged beside ``out`` and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in [*weight_files(round_dir), CONFIG_NAME, MASK_FILE]:
        try:
            os.link(round_dir / name, tmp / name)
        except OSError:
            shutil.copy2(round_dir / name, tmp / name)
    processor.save_pretrained(tmp)
    write_ticket_card(tmp, metadata)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main():
    started = time.time()
    # 1. Arguments: IMP, model, data and every TrainingArguments flag (each round's fine-tune uses them).
    imp_args, model_args, data_args, training_args = parse_arguments("run_imp.py", __doc__)
    if not data_args.language:
        raise UsageError("--language is required: a language code such as en, ca or ast")
    language = resolve_language(data_args.language)
    imp_args.sparsity = sorted({check_sparsity(s) for s in imp_args.sparsity})
    levels = imp_levels(imp_args.sparsity, imp_args.rounds)
    if imp_args.prune_scope not in PRUNE_SCOPES:
        raise UsageError(f"unknown --prune_scope {imp_args.prune_scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    if imp_args.rewind_step < 0:
        raise UsageError(f"--rewind_step {imp_args.rewind_step}: expected an optimizer step of the first round, 0 or more")
    if not training_args.do_train:
        raise UsageError("IMP finds its tickets by training: --do_train False leaves nothing to prune")
    setup_logging(training_args.should_log)
    require_model(model_args.model_name_or_path, model_args.model_revision)
    data_args.language = language.code
    source = model_args.model_name_or_path
    logger.info("IMP on %s (%s) from %s: %d rounds to sparsities %s (levels %s)", language.name, language.code, source, imp_args.rounds,
                imp_args.sparsity, ", ".join(f"{s:.4f}" for s in levels))

    set_seed(training_args.seed)  # the new CTC head's initial weights

    # 2. Data, vocabulary and features (the processor staged until the run is claimed), and the
    #    length of round 0, which the rewind step must fall inside: checked before anything is written.
    with training_args.main_process_first(desc="load data"):
        raw, vocab = load_language_splits(data_args, language)
    with tempfile.TemporaryDirectory() as staging:
        processor = build_processor(vocab, load_feature_extractor(model_args), staging)
    source_vocab = checkpoint_vocab(source, model_args.model_revision)
    model = load_ctc_model(model_args, processor, new_head=source_vocab is not None and source_vocab != vocab)
    with training_args.main_process_first(desc="features"):
        splits = vectorize_splits(raw, processor, model.config, data_args)
    first_steps = optimizer_steps(len(splits["train"]), training_args)
    if imp_args.rewind_step > first_steps:
        raise UsageError(f"--rewind_step {imp_args.rewind_step} is beyond the first round, which takes {first_steps} optimizer steps: "
                         f"expected 0 to {first_steps}")

    # 3. The output dir must be new or hold this same run, which then resumes at its first unfinished round.
    signature = run_signature("run_imp.py", imp_args, model_args, data_args, training_args)
    claim_output_dir(training_args.output_dir, signature, training_args.process_index == 0)
    output = Path(training_args.output_dir)
    rewind = rewind_dir(output)
    if imp_args.rewind_step == 0 and not has_weights(rewind) and training_args.process_index == 0:
        save_weights(model, rewind)  # the starting weights, CTC head included
    params = prunable_parameters(model, imp_args.prune_scope)
    names = list(params)
    spec = PruneSpec(scope=imp_args.prune_scope, method="imp", seed=training_args.seed)
    info = mask_info(spec, language.code, source, model_args.model_revision, model.config.model_type) | {
        "rounds": imp_args.rounds, "rewind_step": imp_args.rewind_step}
    tickets = {s: output / sparsity_dirname(s) for s in imp_args.sparsity}

    # 4. The rounds: prune among the kept weights, rewind, fine-tune with the mask held.
    mask = None
    for r in range(imp_args.rounds + 1):
        round_dir = imp_round_dir(output, r)
        level = levels[r - 1] if r else 0.0
        if (round_dir / IMP_ROUND_FILE).is_file():  # finished in an earlier run (killed, perhaps, before removing its checkpoints)
            mask = Mask.read(round_dir / MASK_FILE).bools() if r else None
            if not training_args.keep_checkpoints and training_args.process_index == 0:
                remove_checkpoints(str(round_dir))
            logger.info("round %d: finished earlier (sparsity %.4f)", r, level)
            continue
        round_started = time.time()
        if r:
            if (round_dir / MASK_FILE).is_file():  # pruned before a kill
                mask = Mask.read(round_dir / MASK_FILE).bools()
            else:  # prune the previous round's model among the weights its mask keeps
                load_weights(model, imp_round_dir(output, r - 1))
                mask = compute_masks(params, [level], within=mask)[level]
                if training_args.process_index == 0:
                    round_dir.mkdir(parents=True, exist_ok=True)
                    Mask.save(round_dir / MASK_FILE, mask, info | {"sparsity": level, "round": r})
            logger.info("round %d: pruned %.4f of the weights left, to sparsity %.4f", r, round_fraction(levels, r), level)
            load_weights(model, rewind)
            apply_mask(model, mask)
        start_digest = weights_digest(model, names)
        args = copy.deepcopy(training_args)
        args.output_dir = str(round_dir)
        callbacks = [HoldMaskCallback(mask)] if r else []
        if r == 0 and imp_args.rewind_step:
            callbacks.append(RewindPointCallback(imp_args.rewind_step, rewind))
        trainer = CTCTrainer(model=model, args=args, data_collator=DataCollatorCTCWithPadding(processor), train_dataset=splits["train"],
                             eval_dataset=splits["validation"], processing_class=processor, callbacks=callbacks)
        metrics = train_and_evaluate(trainer, splits, last_complete_checkpoint(str(round_dir), remove_incomplete=training_args.process_index == 0))
        if training_args.process_index == 0:
            total = sum(p.numel() for p in params.values())
            round_mask = Mask.read(round_dir / MASK_FILE).metadata if r else None
            kept = round_mask["kept_total"] if r else total
            if level in tickets:
                write_ticket(round_dir, tickets[level], round_mask, processor)
            ImpRound(round=r, sparsity=level, kept=kept, total=total, mask_sha256=round_mask["sha256"] if r else None,
                     start_weights_sha256=start_digest, eval_loss=trainer.state.best_metric if trainer.state.best_metric is not None else metrics["eval_loss"],
                     eval_cer=metrics["eval_cer"], test_cer=metrics["test_cer"], steps=trainer.state.global_step,
                     seconds=round(time.time() - round_started, 1), suite_version=__version__).write(round_dir / IMP_ROUND_FILE)
            logger.info("round %d (sparsity %.4f, %d of %d kept): eval CER %.4f, test CER %.4f", r, level, kept, total, metrics["eval_cer"], metrics["test_cer"])
        remove_checkpoints_after_success(trainer)

    # 5. Every round's record, as a table (the main process wrote them).
    if training_args.process_index == 0:
        print("round  sparsity  kept       eval_cer  test_cer")
        for r in range(imp_args.rounds + 1):
            record = ImpRound.read(imp_round_dir(output, r) / IMP_ROUND_FILE)
            print(f"{record.round:5d}  {record.sparsity:.4f}    {record.kept:<9d}  {record.eval_cer:.4f}    {record.test_cer:.4f}")
        for sparsity, out in tickets.items():
            print(f"ticket sparsity={sparsity:.2f} -> {out}")
    logger.info("IMP done in %.1f s", time.time() - started)


if __name__ == "__main__":
    run_cli(main)
