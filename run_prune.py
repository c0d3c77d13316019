#!/usr/bin/env python
"""Prune a model's encoder into language tickets: the paper's second step.

    python run_prune.py --model_name_or_path models/xls-r-300m-en --language en \
        --sparsity 0.7 0.8 0.9 --output_dir tickets/en --evaluate_on test \
        --push_to_hub --hub_model_id me/xls-r-300m-en-ticket --hub_mask_repo_id me/xls-r-300m-masks

One-shot global unstructured L1-magnitude pruning of every nn.Linear weight in the transformer
encoder layers (``--prune_scope`` widens it), exactly ``round(sparsity * N)`` weights, several
sparsities in one pass. Pruning the pretrained base model (no CTC head) is the paper's control
(``--language base``). One sparsity writes the ticket to ``--output_dir``; several write
``--output_dir/sparsity-0.70/`` and so on. A ticket is a plain transformers model with zeros
where the mask prunes, plus ``mask.safetensors`` and a model card; ``--evaluate_on test`` scores
each ticket as pruned on its language's test split (data flags as in run_finetune.py) and puts
that score in the card's model-index.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

# Only what reads and checks the command line is imported up front: --help and a bad flag answer
# before torch and transformers load (the steps below import them).
from utils.arguments import DataArguments, PruneArguments, parse_arguments
from utils.errors import UsageError
from utils.hub_client import check_repo_id
from utils.languages import resolve_language
from utils.layout import MASK_FILE, sparsity_dirname
from utils.runs import run_cli, setup_logging
from utils.structure import PRUNE_METHODS, PRUNE_SCOPES, check_sparsity

logger = logging.getLogger(__name__)


def ticket_repo(args: PruneArguments, sparsity: float) -> Optional[str]:
    if not args.hub_model_id:
        return None
    return args.hub_model_id if len(args.sparsity) == 1 else f"{args.hub_model_id}-{sparsity_dirname(sparsity)}"


def source_language(args: PruneArguments, data_args: DataArguments) -> Optional[str]:
    """--language, else the language recorded by run_finetune.py in the source directory."""
    if data_args.language:
        return "base" if data_args.language == "base" else resolve_language(data_args.language).code
    signature = Path(args.model_name_or_path) / "run_signature.json"
    if signature.is_file():
        return json.loads(signature.read_text(encoding="utf-8")).get("language")
    return None


def main():
    # 1. Arguments, checked before anything is loaded or written.
    args, data_args = parse_arguments("run_prune.py", __doc__)
    setup_logging(True)
    args.sparsity = sorted({check_sparsity(s) for s in args.sparsity})
    if args.prune_scope not in PRUNE_SCOPES:
        raise UsageError(f"unknown --prune_scope {args.prune_scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    if args.method not in PRUNE_METHODS:
        raise UsageError(f"unknown --method {args.method!r}: expected one of {', '.join(PRUNE_METHODS)}")
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id ORG/NAME")
    for flag in ("hub_model_id", "hub_mask_repo_id"):
        if getattr(args, flag):
            check_repo_id(getattr(args, flag), f"--{flag}")
    language = source_language(args, data_args)
    if args.hub_mask_repo_id and not language:
        raise UsageError("--hub_mask_repo_id needs --language (a language code, or 'base' for the pretrained control)")
    if args.evaluate_on not in (None, "test", "validation"):
        raise UsageError(f"--evaluate_on {args.evaluate_on!r}: expected test or validation")
    if args.evaluate_on and language in (None, "base"):
        raise UsageError(f"--evaluate_on needs a language ticket: --language {language or '(none)'} has no transcripts to score "
                         "(the pretrained base model has no CTC head)")

    # 2. Claim each ticket directory (new, or holding this same ticket), plan every mask in one pass
    #    over the source's weights (read from its safetensors files), and write the tickets.
    from utils.masks import Mask
    from utils.model import require_model
    from utils.tickets import PruneSpec, build_tickets, ticket_dirs

    require_model(args.model_name_or_path, args.model_revision)
    spec = PruneSpec(scope=args.prune_scope, method=args.method, layerwise=args.layerwise, seed=args.seed)
    targets = ticket_dirs(args.output_dir, args.sparsity)
    built = build_tickets(args.model_name_or_path, args.model_revision, targets, spec, language, compress=args.compress)
    infos = {s: built.get(s) or Mask.read(out / MASK_FILE).metadata for s, out in targets.items()}  # new tickets, and reused ones

    # 3. With --evaluate_on: score each ticket as pruned (greedy CTC, per-utterance rows beside it)
    #    and put the score in its card's model-index.
    if args.evaluate_on:
        from transformers import AutoConfig, AutoModelForCTC, AutoProcessor, TrainingArguments

        from utils.data import dataset_reference, load_raw_splits, normalize_splits
        from utils.features import DataCollatorCTCWithPadding, vectorize_splits
        from utils.hub import CardEvaluation, write_ticket_card
        from utils.training import CTCTrainer

        spoken = resolve_language(language)
        raw = normalize_splits(load_raw_splits(data_args, spoken, wanted=(args.evaluate_on,)), spoken, data_args.chars_to_ignore)
        prefix = "test" if args.evaluate_on == "test" else "eval"
        first = targets[args.sparsity[0]]  # every ticket has the source's processor and architecture
        processor = AutoProcessor.from_pretrained(first)
        split = vectorize_splits(raw, processor, AutoConfig.from_pretrained(first), data_args)[args.evaluate_on]
        reference = dataset_reference(data_args, spoken, args.evaluate_on)
        for sparsity, out in targets.items():
            scorer = CTCTrainer(model=AutoModelForCTC.from_pretrained(out), processing_class=processor, data_collator=DataCollatorCTCWithPadding(processor),
                                args=TrainingArguments(output_dir=str(out), per_device_eval_batch_size=args.per_device_eval_batch_size, report_to=[]))
            metrics = scorer.evaluate(split, metric_key_prefix=prefix)
            evaluation = CardEvaluation(reference, metrics[f"{prefix}_cer"], metrics[f"{prefix}_wer"], len(split))
            write_ticket_card(out, infos[sparsity], evaluation)
            print(f"ticket sparsity={sparsity:.2f} as pruned: {args.evaluate_on} CER {evaluation.cer:.4f} WER {evaluation.wer:.4f} ({len(split)} utterances)")

    # 4. Share: ticket as a model repo, mask into the masks dataset repo with its index row.
    from utils.hub import mask_path_in_repo, push_mask, push_ticket

    for sparsity in args.sparsity:
        out, info = targets[sparsity], infos[sparsity]
        repo = ticket_repo(args, sparsity)
        if args.push_to_hub:
            logger.info("pushed %s: %s", repo, push_ticket(out, repo, token=args.hub_token, private=args.hub_private_repo))
        if args.hub_mask_repo_id:
            path_in_repo = mask_path_in_repo(language, sparsity, args.method, args.prune_scope, args.layerwise)
            row = {
                "file": path_in_repo,
                "language": language,
                "sparsity": f"{sparsity:.2f}",
                "method": args.method,
                "scope": args.prune_scope,
                "layerwise": args.layerwise,
                "source_model": args.model_name_or_path,
                "source_revision": info.get("source_revision") or "",
                "ticket_repo": repo or "",
                "sha256": hashlib.sha256((out / MASK_FILE).read_bytes()).hexdigest(),
                "kept": info["kept_total"],
                "total": info["total"],
            }
            pushed = push_mask(out / MASK_FILE, args.hub_mask_repo_id, row, token=args.hub_token, private=args.hub_private_repo)
            logger.info("%s %s:%s", "pushed" if pushed else "unchanged", args.hub_mask_repo_id, path_in_repo)
        print(f"ticket sparsity={sparsity:.2f} kept={info['kept_total']}/{info['total']} -> {out}")


if __name__ == "__main__":
    run_cli(main)
