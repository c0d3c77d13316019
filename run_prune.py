#!/usr/bin/env python
"""Prune a model's encoder into language tickets: the paper's second step.

    python run_prune.py --model_name_or_path models/xlsr-en --language en \
        --sparsity 0.7 0.8 0.9 --output_dir tickets/en \
        --push_to_hub --hub_model_id me/xlsr-300m-en-ticket --hub_mask_repo_id me/xlsr-300m-masks

One-shot global unstructured L1-magnitude pruning of every nn.Linear weight in the transformer
encoder layers (``--prune_scope`` widens it), exactly ``round(sparsity * N)`` weights, several
sparsities in one pass. Pruning the pretrained base model (no CTC head) is the paper's control
(``--language base``). One sparsity writes the ticket to ``--output_dir``; several write
``--output_dir/sparsity-0.70/`` and so on. A ticket is a plain transformers model with zeros
where the mask prunes, plus ``mask.safetensors`` and a model card.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional


from utils.arguments import PruneArguments, parse_arguments
from utils.errors import UsageError
from utils.hub import check_repo_id, mask_path_in_repo, push_mask, push_ticket
from utils.languages import resolve_language
from utils.layout import sparsity_dirname
from utils.masks import MASK_FILE, PRUNE_METHODS, PRUNE_SCOPES, Mask, check_sparsity
from utils.runs import run_cli, setup_logging
from utils.tickets import PruneSpec, build_tickets, ticket_dirs

logger = logging.getLogger(__name__)


def ticket_repo(args: PruneArguments, sparsity: float) -> Optional[str]:
    if not args.hub_model_id:
        return None
    return args.hub_model_id if len(args.sparsity) == 1 else f"{args.hub_model_id}-{sparsity_dirname(sparsity)}"


def source_language(args: PruneArguments) -> Optional[str]:
    """--language, else the language recorded by run_finetune.py in the source directory."""
    if args.language:
        return "base" if args.language == "base" else resolve_language(args.language).code
    signature = Path(args.model_name_or_path) / "run_signature.json"
    if signature.is_file():
        return json.loads(signature.read_text(encoding="utf-8")).get("language")
    return None


def main():
    # 1. Arguments, checked before anything is loaded or written.
    (args,) = parse_arguments("run_prune.py")
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
    language = source_language(args)
    if args.hub_mask_repo_id and not language:
        raise UsageError("--hub_mask_repo_id needs --language (a language code, or 'base' for the pretrained control)")

    # 2. Claim each ticket directory (new, or holding this same ticket), load the source once,
    #    compute every mask in one pass over its weights, and write the tickets.
    spec = PruneSpec(scope=args.prune_scope, method=args.method, layerwise=args.layerwise, seed=args.seed)
    targets = ticket_dirs(args.output_dir, args.sparsity)
    infos = build_tickets(args.model_name_or_path, args.model_revision, targets, spec, language, compress=args.compress)

    # 3. Share: ticket as a model repo, mask into the masks dataset repo with its index row.
    for sparsity in args.sparsity:
        out = targets[sparsity]
        info = infos.get(sparsity) or Mask.read(out / MASK_FILE).metadata
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
