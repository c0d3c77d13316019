#!/usr/bin/env python
"""What the language-specific weights of tickets do (the paper's open question 3): causal
ablation, representational similarity and linear probes, for the tickets of one sparsity.

    python run_analysis.py --tickets en=tickets/en/sparsity-0.90 de=tickets/de/sparsity-0.90 \
        --transfers en-en=transfer/en-en/sparsity-0.90 en-ca=transfer/en-ca/sparsity-0.90 \
        --upstream_models en=finetune/en de=finetune/de --base_model facebook/wav2vec2-xls-r-300m \
        --output_dir analysis/sparsity-0.90

- ablation: in each transfer UP-DOWN (UP's ticket fine-tuned on DOWN, its mask held), zero the
  weights UP's ticket keeps and another ticket prunes ("UP-only"), and, as the control, as many of
  UP's kept weights per tensor drawn at random (``--control_seeds`` draws); test CER on DOWN for
  each, over every tensor and (``--ablation_groups``) within each encoder layer and module type.
  Zeroing nothing reproduces the transfer's own ``predictions_test.jsonl`` (checked, and kept).
- cka: linear CKA layer by layer between ticket and ticket, ticket and its dense upstream model,
  ticket and the base, on the same frames of the same test utterances of each language.
- probes: language identity from each layer's mean state of each utterance (a ridge classifier,
  repeated stratified k-fold) for the base, the upstream models and the tickets, beside the same
  probe on shuffled labels.
- phones (asked for by name): the phone at each frame, per language, from the same frames as CKA,
  each utterance's frames in one fold. Needs phone timings: the generated corpus makes them
  (``utils/phones.py``); for other data, a ``phones.jsonl`` in the test split's folder.

Writes ``analysis.json`` (an AnalysisSummary with every utterance's edit counts), ``ablation.csv``,
``cka.csv``, ``probes.csv`` and ``ANALYSIS.md`` (tables with intervals; one seed, so they count test
sampling only: run_grid.py's report pools a study's seeds) with ``cka.png`` and ``probes.png``.
Typological distances are compared with a whole study's numbers in run_grid.py's report.
"""

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCTC, AutoProcessor

from utils import __version__
from utils.ablation import check_comparable, count, groups, only_in, random_like, restricted, zeroed
from utils.analysis import ALL, ablation_markdown, cka_markdown, probes_markdown
from utils.arguments import ANALYSES, GENERATED, fill_language, parse_arguments
from utils.data import load_raw_splits, normalize_splits
from utils.errors import MissingInput, UsageError
from utils.features import DataCollatorCTCWithPadding, vectorize_splits
from utils.languages import resolve_language
from utils.layout import ANALYSIS_FILE, RESULTS_FILE
from utils.masks import Mask
from utils.metrics import corpus_rates, predictions_path, read_predictions
from utils.phones import PAUSE, add_phone_timings, frame_labels, read_phone_timings
from utils.probes import chance, common_labels, probe_accuracies
from utils.pruning import check_mask_fits
from utils.records import AnalysisSummary, TransferResult
from utils.report import write_csv_atomic
from utils.representations import check_layers, layer_states, linear_cka
from utils.runs import atomic_open, claim_output_dir, run_cli, run_signature, setup_logging
from utils.structure import frame_hop_seconds, front_end_key
from utils.training import CTCTrainer

logger = logging.getLogger(__name__)
ABLATED = "ablated"  # the metric prefix (and predictions file) of every evaluation with weights zeroed
ABLATION_COLUMNS = ["upstream", "downstream", "versus", "condition", "group", "control_seed", "zeroed", "kept", "cer", "loss"]
CKA_COLUMNS = ["language", "kind", "a", "b", "layer", "cka"]
PROBE_COLUMNS = ["task", "language", "model", "layer", "accuracy", "control", "chance"]


def labelled(items: list[str], flag: str) -> dict[str, str]:
    """``LABEL=PATH`` items as a mapping, each label once."""
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"{flag} item {item!r} is not LABEL=PATH: expected e.g. en=tickets/en/sparsity-0.90")
        if label in out:
            raise UsageError(f"{flag} label {label!r} is given twice: expected one path per label")
        out[label] = path
    return out


def evaluation_set(data_args, code: str, preprocessor, config):
    """``code``'s test split as model inputs (``{language}`` in a data flag filled with ``code``)."""
    language = resolve_language(code)
    filled = type(data_args)(**{k: fill_language(v, code, f"--{k}") if isinstance(v, str) else v for k, v in asdict(data_args).items()})
    filled.language = code
    raw = normalize_splits(load_raw_splits(filled, language, wanted=("test",)), language, filled.chars_to_ignore)
    return vectorize_splits(raw, preprocessor, config, filled)["test"]


def phone_timings(data_args, code: str) -> dict[str, list]:
    """The test split's phones with timings by clip id: read from its folder's phones.jsonl, made
    first for a generated corpus (a folder of other data without the file is one line saying so)."""
    if data_args.data_dir:
        split = Path(fill_language(data_args.data_dir, code, "--data_dir")) / data_args.test_split_name
    elif data_args.dataset_name == GENERATED:
        split = Path(data_args.generated_corpus_dir).expanduser() / code / data_args.test_split_name
    else:
        raise MissingInput(f"--analyses phones on {data_args.dataset_name}: a frame-level phone probe needs phone labels with timings, which this "
                           "dataset does not hold; give a --data_dir whose test split holds phones.jsonl (e.g. from a forced aligner), or the generated corpus")
    return read_phone_timings(add_phone_timings(split).parent)


def check_transfer(up: str, down: str, folder: Path, mask: Mask) -> None:
    """The transfer must be UP's ticket (this very mask) fine-tuned on DOWN."""
    result = TransferResult.read(folder / RESULTS_FILE)
    if result.ticket_mask_sha256 != mask.metadata["sha256"] or result.downstream != down:
        raise UsageError(f"--transfers {up}-{down}={folder} holds the transfer of ticket {result.ticket!r} to {result.downstream!r}: "
                         f"expected the {up} ticket given in --tickets fine-tuned on {down}")


def model_layers(models: dict[str, str], layers: Optional[list[int]]) -> tuple[dict, list[int]]:
    """The models' configs (one family and size) and the layers asked for, each one they have."""
    configs = {label: AutoConfig.from_pretrained(path) for label, path in models.items()}
    first = next(iter(models))
    for label, config in configs.items():
        if front_end_key(config) != front_end_key(configs[first]) or config.num_hidden_layers != configs[first].num_hidden_layers:
            raise UsageError(f"model {label} ({models[label]}) has another architecture than {first} ({models[first]}): expected models of one family and size")
    return configs, check_layers(layers, configs[first].num_hidden_layers)


def ablate(up: str, down: str, folder: Path, masks: dict[str, Mask], keeps: dict, args, data_args, training_args, out: Path) -> list[dict]:
    """Every ablation of one transfer: intact, then UP-only against each other ticket and its random
    controls, over all tensors and per group. Rows carry each utterance's edit counts."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForCTC.from_pretrained(folder)
    check_mask_fits(model, keeps[up])
    test = evaluation_set(data_args, down, processor, model.config)
    scratch = out / "ablation" / f"{up}-{down}"
    evaluation = copy.copy(training_args)
    evaluation.output_dir = str(scratch)
    trainer = CTCTrainer(model=model, args=evaluation, data_collator=DataCollatorCTCWithPadding(processor), eval_dataset=test, processing_class=processor)

    def score(prefix: str) -> tuple[list, float]:
        """The per-utterance rows and the mean CTC loss (more sensitive than CER when a model is weak)."""
        metrics = trainer.evaluate(test, metric_key_prefix=prefix)
        return read_predictions(predictions_path(scratch, prefix)), metrics[f"{prefix}_loss"]

    def row(condition: str, versus=None, group=ALL, draw=None, zeroed_count=0, scored=((), float("nan"))) -> dict:
        utterances, loss = scored
        return {"upstream": up, "downstream": down, "versus": versus, "condition": condition, "group": group, "control_seed": draw,
                "zeroed": zeroed_count, "kept": masks[up].metadata["kept_total"], "cer": corpus_rates(utterances)["cer"], "loss": loss,
                "edits": [u.char_edits for u in utterances], "lengths": [u.ref_chars for u in utterances]}

    intact, intact_loss = score("test")
    own = read_predictions(predictions_path(folder, "test"))
    if [u.id for u in intact] != [u.id for u in own]:
        raise UsageError(f"{folder}: its own test predictions cover other utterances than the test set here ({len(own)} vs {len(intact)}): "
                         "expected the data flags the transfer was run with")
    if intact != own:
        logger.warning("%s-%s: the intact model's transcripts differ from the transfer's own predictions (another eval batch size?)", up, down)
    rows = [row("intact", scored=(intact, intact_loss)) | {"ids": [u.id for u in intact], "matches_own": intact == own}]
    for other in masks:
        if other == up:
            continue
        chosen = only_in(keeps[up], keeps[other])
        sets = {ALL: chosen} | ({group: restricted(chosen, members) for group, members in groups(chosen).items()} if args.ablation_groups else {})
        for group, selection in sets.items():
            n = count(selection)
            if n == 0:
                continue
            with zeroed(model, selection):
                rows.append(row("only", other, group, None, n, score(ABLATED)))
            for draw in range(args.control_seeds):
                with zeroed(model, random_like(keeps[up], selection, seed=draw)):
                    rows.append(row("random", other, group, draw, n, score(ABLATED)))
        ablated = next(r["cer"] for r in rows if r["versus"] == other and r["condition"] == "only" and r["group"] == ALL)
        logger.info("%s-%s: zeroing the %d weights %s keeps and %s prunes: CER %.4f (intact %.4f)", up, down, count(chosen), up, other, ablated, rows[0]["cer"])
    predictions_path(scratch, ABLATED).unlink(missing_ok=True)
    return rows


def representations(models: dict[str, str], configs: dict, layers: list[int], tickets: dict[str, str], languages: list[str], args, data_args,
                    device) -> tuple[list[dict], list[dict]]:
    """CKA rows per language, model pair and layer; probe rows per model and layer."""
    first = next(iter(models))
    extractor = AutoFeatureExtractor.from_pretrained(models[first])
    pairs = [("ticket-ticket", f"ticket:{a}", f"ticket:{b}") for i, a in enumerate(tickets) for b in list(tickets)[i + 1 :]]
    pairs += [("ticket-upstream", f"ticket:{a}", f"upstream:{a}") for a in tickets if f"upstream:{a}" in models]
    pairs += [("ticket-base", f"ticket:{a}", "base") for a in tickets if "base" in models and a != "base"]
    hop = frame_hop_seconds(configs[first])
    cka_rows, probe_rows, pooled = [], [], {label: {} for label in models}
    for code in languages:
        test = evaluation_set(data_args, code, extractor, configs[first])
        timings = phone_timings(data_args, code) if "phones" in args.analyses else {}
        states = {}
        for label, path in models.items():
            model = AutoModel.from_pretrained(path).to(device)
            states[label] = layer_states(model, extractor, test, layers, args.frames_per_utterance)
            if states[label].lengths != states[first].lengths:  # CKA and the phone probe compare frame by frame
                raise UsageError(f"{label} and {first} gave different frame counts on the {code} test set: expected models of one architecture")
            pooled[label][code] = states[label].pooled
            del model
        if timings:
            probe_rows += phone_probes(states, timings, list(test["id"]), hop, code, layers, args)
        for kind, a, b in pairs if "cka" in args.analyses else []:
            cka_rows += [{"language": code, "kind": kind, "a": a, "b": b, "layer": layer, "cka": linear_cka(states[a].frames[layer], states[b].frames[layer])}
                         for layer in layers]
        logger.info("%s: hidden states of %d models on %d utterances", code, len(models), len(test))
    for label in models if "probes" in args.analyses else []:
        labels = np.concatenate([[code] * len(pooled[label][code][layers[0]]) for code in languages])
        for layer in layers:
            features = np.concatenate([pooled[label][code][layer] for code in languages])
            probe_rows.append(probe_row("language", None, label, layer, features, labels, args))
    return cka_rows, probe_rows


def probe_row(task: str, language, model: str, layer: int, features: np.ndarray, labels: np.ndarray, args, groups=None) -> dict:
    """One probe's accuracies per (seed, fold), beside its shuffled-label control's."""
    return {"task": task, "language": language, "model": model, "layer": layer, "chance": chance(labels),
            "accuracies": probe_accuracies(features, labels, args.probe_seeds, args.probe_folds, groups=groups).tolist(),
            "control": probe_accuracies(features, labels, args.probe_seeds, args.probe_folds, shuffled=True, groups=groups).tolist()}


def phone_probes(states: dict, timings: dict[str, list], ids: list[str], hop: float, code: str, layers: list[int], args) -> list[dict]:
    """The phone at each sampled frame from each layer of each model, pauses and rare phones left out."""
    missing = [i for i in ids if i not in timings]
    if missing:
        raise MissingInput(f"{code}: {len(missing)} test clip(s) have no phone timings (e.g. {missing[0]!r}): expected one row per clip in phones.jsonl")
    any_states = next(iter(states.values()))
    labels = np.concatenate([np.array(frame_labels(timings[i], n, hop), dtype=object)[pos] for i, n, pos in zip(ids, any_states.lengths, any_states.positions)])
    groups = np.concatenate([[u] * len(pos) for u, pos in enumerate(any_states.positions)])
    keep = (labels != "") & np.array([not str(x).startswith(PAUSE) for x in labels])
    keep &= common_labels(labels, 2 * args.probe_folds)
    return [probe_row("phones", code, label, layer, found.frames[layer][keep], labels[keep].astype(str), args, groups[keep])
            for label, found in states.items() for layer in layers]


def main():
    # 1. Arguments: the tickets, the models to analyse, the analyses, data flags, evaluation flags.
    args, data_args, training_args = parse_arguments("run_analysis.py", __doc__)
    setup_logging(training_args.should_log)
    unknown = sorted(set(args.analyses) - set(ANALYSES))
    if unknown:
        raise UsageError(f"unknown --analyses {unknown}: expected some of {', '.join(ANALYSES)}")
    tickets = labelled(args.tickets, "--tickets")
    if len(tickets) < 2:
        raise UsageError(f"got {len(tickets)} ticket(s): expected at least two to compare")
    transfers = {}
    for name, path in labelled(args.transfers, "--transfers").items():
        up, sep, down = name.partition("-")
        if not sep or up not in tickets:
            raise UsageError(f"--transfers label {name!r}: expected UP-DOWN with UP one of the --tickets labels ({', '.join(tickets)})")
        transfers[(up, resolve_language(down).code)] = Path(path)
    if "ablation" in args.analyses and not transfers:
        raise UsageError("--analyses ablation needs --transfers: expected UP-DOWN=DIR of the tickets' transfers")
    upstream_models = labelled(args.upstream_models, "--upstream_models")
    languages = [resolve_language(code).code for code in args.languages] or list(dict.fromkeys(
        [label for label in tickets if label != "base"] + [down for _, down in transfers]))

    # 2. Before anything is written: the masks (one sparsity, one model family, the same tensors),
    #    each transfer made from its ticket, the models' layers.
    masks = {label: Mask.load(path, label) for label, path in tickets.items()}
    first = next(iter(masks.values()))
    for mask in masks.values():
        check_comparable(first, mask)
    sparsity = first.metadata["sparsity"]
    for (up, down), folder in transfers.items() if "ablation" in args.analyses else []:
        check_transfer(up, down, folder, masks[up])
    models = ({"base": args.base_model} if args.base_model else {}) | {f"upstream:{k}": v for k, v in upstream_models.items()} | {f"ticket:{k}": v for k, v in tickets.items()}
    hidden = bool({"cka", "probes", "phones"} & set(args.analyses))
    configs, layers = model_layers(models, args.layers) if hidden else ({}, [])
    claim_output_dir(training_args.output_dir, run_signature("run_analysis.py", args, data_args))
    out = Path(training_args.output_dir)
    keeps = {label: mask.bools() for label, mask in masks.items()}

    # 3. Causal ablation in every transfer.
    ablation_rows = []
    for (up, down), folder in transfers.items() if "ablation" in args.analyses else []:
        ablation_rows += ablate(up, down, folder, masks, keeps, args, data_args, training_args, out)

    # 4. Hidden states: CKA between models, probes per layer.
    cka_rows, probe_rows = representations(models, configs, layers, tickets, languages, args, data_args, training_args.device) if hidden else ([], [])

    # 5. The record, its tables and figures.
    summary = AnalysisSummary(sparsity, training_args.seed, tickets, list(args.analyses), layers, ablation_rows, cka_rows, probe_rows,
                              args.probe_folds, __version__)
    summary.write(out / ANALYSIS_FILE)
    write_csv_atomic(out / "ablation.csv", ablation_rows, ABLATION_COLUMNS)
    write_csv_atomic(out / "cka.csv", cka_rows, CKA_COLUMNS)
    write_csv_atomic(out / "probes.csv", [r | {"accuracy": float(np.mean(r["accuracies"])), "control": float(np.mean(r["control"]))} for r in probe_rows],
                     PROBE_COLUMNS)
    parts = [f"# Analysis of the tickets at {sparsity:.0%} sparsity (seed {training_args.seed})\n"]
    if ablation_rows:
        parts.append("## Ablation\n\n" + ablation_markdown([summary.to_dict()])[0] + "\n")
    if cka_rows:
        parts.append("## Representational similarity\n\n" + cka_markdown([summary.to_dict()], out, "") + "\n")
    if probe_rows:
        parts.append("## Probes\n\n" + probes_markdown([summary.to_dict()], out, "") + "\n")
    with atomic_open(out / "ANALYSIS.md") as f:
        f.write("\n".join(parts))
    logger.info("wrote %s", out / "ANALYSIS.md")


if __name__ == "__main__":
    run_cli(main)
