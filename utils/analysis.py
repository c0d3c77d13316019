"""What the analyses of the language-specific weights say, as tables with intervals: from
run_analysis.py's ``AnalysisSummary`` records (one per study seed, at one sparsity) for the
ablation, CKA and probes, and from a study's transfer results and mask IoU for the typology.
run_analysis.py writes them for its one seed (ANALYSIS.md); run_grid.py's report pools the seeds.

Ablation statistics pair by utterance and by study seed (``utils.stats``): a cell is one transfer
(ticket UP fine-tuned on DOWN) under one condition; the random control's edits are the mean over
its draws, utterance by utterance. The specificity contrast, (UP-only − random) on UP's own
language minus the same on another language, compares two transfers of UP's ticket on two test
sets: the sets are independent, so their variances add.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Sequence

import numpy as np

from .errors import UsageError
from .probes import accuracy_interval
from .records import StudyResults
from .report import fmt_difference, markdown_table, pct, save_figure
from .stats import ALPHA, Interval, Rates, cell_interval, combination_interval, detectable_line, difference_interval, holm, holm_marks
from .typology import DISTANCES, distance_matrix, language_pairs, permutation_correlation, transfer_cells

ALL = "all"  # the group of an ablation over every tensor


# ---------------------------------------------------------------------------------------------
# Ablation


def ablation_cells(summaries: Sequence[dict]) -> dict[tuple[str, str, str, str], dict[str, Rates]]:
    """``(up, down, versus, group) -> {"intact"|"only"|"random": Rates}``, one row per study seed;
    every seed's transfer of one cell must have been tested on the same utterances."""
    edits: dict[tuple, dict[str, dict[int, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    reference: dict[tuple[str, str], tuple[list[str], int]] = {}
    for summary in summaries:
        seed = summary["seed"]
        for row in summary["ablation"]:
            up, down = row["upstream"], row["downstream"]
            if row["condition"] == "intact":
                ids = row["ids"]
                first = reference.setdefault((up, down), (ids, seed))
                if ids != first[0]:
                    shared = len(set(ids) & set(first[0]))
                    raise UsageError(f"{up}-{down}: seed {seed}'s test set shares {shared} of {len(ids)} utterances with seed {first[1]}'s: "
                                     "expected the same test set in every seed")
                continue
            edits[(up, down, row["versus"], row["group"])][row["condition"]][seed].append((row["edits"], row["lengths"]))
    intact = {(s["seed"], r["upstream"], r["downstream"]): (r["edits"], r["lengths"]) for s in summaries for r in s["ablation"] if r["condition"] == "intact"}
    cells = {}
    for key, by_condition in edits.items():
        up, down = key[0], key[1]
        seeds = sorted(set.intersection(*(set(v) for v in by_condition.values())) & {s for s, u, d in intact if (u, d) == (up, down)})
        if not seeds:
            continue
        cells[key] = {"intact": Rates.from_seeds([intact[(s, up, down)] for s in seeds], seeds)}
        for condition, per_seed in by_condition.items():
            draws = [per_seed[s] for s in seeds]  # the random control's draws averaged per utterance
            cells[key][condition] = Rates(np.array([np.mean([e for e, _ in d], axis=0) for d in draws], dtype=np.float64),
                                          np.array([d[0][1] for d in draws], dtype=np.float64), tuple(seeds))
    return cells


def zeroed_share(summaries: Sequence[dict]) -> dict[tuple[str, str, str], float]:
    """Share of the ticket's kept weights each (up, versus, group) ablation zeroes, mean over seeds."""
    shares: dict[tuple, list[float]] = defaultdict(list)
    for summary in summaries:
        for row in summary["ablation"]:
            if row["condition"] == "only":
                shares[(row["upstream"], row["versus"], row["group"])].append(row["zeroed"] / row["kept"])
    return {k: mean(v) for k, v in shares.items()}


def _marks_note(intervals: Sequence[Interval], what: str) -> str:
    if not intervals:
        return ""
    if min(ci.seeds for ci in intervals) < 2:
        return "No marks: with one seed the intervals miss training noise."
    return f"\\* marks a difference that survives Holm-Bonferroni correction (family-wise {ALPHA:g}) over the {len(intervals)} {what}."


def ablation_markdown(summaries: Sequence[dict]) -> tuple[str, dict]:
    """Three tables: each ablation against the intact model and the random control; how much more
    the UP-only weights matter on UP's own language than on others; where (layer, module) they matter."""
    cells = ablation_cells(summaries)
    shares = zeroed_share(summaries)
    overall = {k: v for k, v in cells.items() if k[3] == ALL}
    vs_intact = {k: difference_interval({k[1]: v["only"]}, {k[1]: v["intact"]}) for k, v in overall.items()}
    vs_random = {k: difference_interval({k[1]: v["only"]}, {k[1]: v["random"]}) for k, v in overall.items()}
    marked = dict(zip(vs_random, holm_marks(list(vs_random.values()))))
    rows = []
    for key in sorted(overall):
        up, down, versus, _ = key
        rows.append([f"**{up}** → {down}", versus, f"{pct(shares[(up, versus, ALL)])}", fmt_rate(overall[key]["intact"], down),
                     fmt_difference(vs_intact[key], False), fmt_difference(vs_random[key], marked[key])])
    header = ["transfer", "zeroed: kept by it, pruned by", "zeroed % of kept", "intact CER %", "zeroed − intact (pp)", "zeroed − random (pp)"]
    parts = ["Each transfer (the upstream ticket fine-tuned on the downstream language, its mask held) with the weights its ticket keeps "
             "and another ticket prunes set to 0, against the intact model and against the control: as many of the ticket's kept weights "
             "per tensor, drawn at random (mean over the draws). Positive: zeroing them costs more than zeroing random kept weights. "
             + _marks_note(list(vs_random.values()), "differences from the control"),
             markdown_table(header, rows)]
    if line := detectable_line(list(vs_random.values())):
        parts.append(line)

    specific = {}
    for (up, down, versus, group), v in overall.items():
        own = overall.get((up, up, versus, group))
        if down == up or own is None:
            continue
        specific[(up, versus, down)] = combination_interval([(1.0, up, own["only"]), (-1.0, up, own["random"]), (-1.0, down, v["only"]), (1.0, down, v["random"])])
    numbers = {"vs_random": {"-".join(k[:3]): ci.numbers(marked[k]) for k, ci in vs_random.items()}}
    if specific:
        spec_marks = dict(zip(specific, holm_marks(list(specific.values()))))
        rows = [[f"**{up}**", versus, down, fmt_difference(ci, spec_marks[(up, versus, down)])] for (up, versus, down), ci in sorted(specific.items())]
        parts.append("Do the weights only one ticket keeps matter more for its own language? (zeroed − random) on the upstream language's own "
                     "test set minus the same on another downstream language, in pp; positive: more on its own. "
                     + _marks_note(list(specific.values()), "contrasts"))
        parts.append(markdown_table(["ticket", "zeroed: kept by it, pruned by", "other language", "own − other (pp)"], rows))
        numbers["specificity"] = {"-".join(k): ci.numbers(spec_marks[k]) for k, ci in specific.items()}

    by_group: dict[str, list[tuple]] = defaultdict(list)
    for (up, down, versus, group), v in cells.items():
        if group != ALL:
            by_group[group].append((down, v))
    if by_group:
        where = {}
        for group, members in by_group.items():  # mean over every (transfer, other ticket) of (only − random) within the group
            terms = [(w / len(members), down, v[c]) for down, v in members for w, c in ((1.0, "only"), (-1.0, "random"))]
            where[group] = combination_interval(terms)
        where_marks = dict(zip(where, holm_marks(list(where.values()))))
        order = sorted(where, key=lambda g: (not g.startswith("layer"), int(g.split()[1]) if g.startswith("layer") else 0, g))
        rows = [[group, fmt_difference(where[group], where_marks[group])] for group in order]
        parts.append("Where the weights that matter sit: the same ablation restricted to one encoder layer or one module type, (zeroed − random) "
                     "in pp, averaged over every transfer and other ticket. " + _marks_note(list(where.values()), "groups"))
        parts.append(markdown_table(["layer or module", "zeroed − random (pp)"], rows))
        numbers["groups"] = {g: ci.numbers(where_marks[g]) for g, ci in where.items()}
    return "\n\n".join(parts), numbers


def fmt_rate(rates: Rates, test_set: str) -> str:
    ci = cell_interval(rates, test_set)
    return f"{pct(ci.estimate)} [{pct(ci.low)}, {pct(ci.high)}]"


# ---------------------------------------------------------------------------------------------
# Representational similarity and probes


def cka_table(summaries: Sequence[dict]) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """``(kind, a, b) -> {layer: [CKA per language and seed]}``."""
    table: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        for row in summary["cka"]:
            table[(row["kind"], row["a"], row["b"])][row["layer"]].append(row["cka"])
    return table


def cka_markdown(summaries: Sequence[dict], figures: Path, link_prefix: str, tag: str = "") -> str:
    table = cka_table(summaries)
    layers = sorted({layer for per_layer in table.values() for layer in per_layer})
    rows = [[kind, f"{a} – {b}"] + [_spread(per_layer.get(layer, [])) for layer in layers] for (kind, a, b), per_layer in sorted(table.items())]
    plot_layers({f"{a} – {b}": {layer: mean(v) for layer, v in per_layer.items()} for (_, a, b), per_layer in sorted(table.items())},
                "linear CKA", "Representational similarity per layer", figures / f"cka{tag}.png")
    return ("Linear CKA (Kornblith et al., 2019) between two models' hidden states on the same frames of the same test utterances, "
            "per layer (0: the encoder's input), mean [min, max] over test languages and seeds; 1: the same representation up to rotation "
            f"and scale.\n\n{markdown_table(['pair', 'models'] + [f'layer {layer}' for layer in layers], rows)}\n\n![CKA per layer]({link_prefix}cka{tag}.png)")


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{mean(values):.3f}" + (f" [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else "")


PROBE_TASKS = {
    "language": ("Language identity from each layer: a linear probe (ridge classifier) on each utterance's mean hidden state, accuracy (%) on held-out "
                 "utterances", "chance: the most frequent language"),
    "phones": ("The phone at each frame, by the same probe (the same sampled frames as CKA; pauses and phones seen fewer than twice per fold left out), per test "
               "language, accuracy (%) on the frames of held-out utterances (an utterance's frames stay in one fold)", "chance: each language's most frequent phone, averaged"),
}


def probes_markdown(summaries: Sequence[dict], figures: Path, link_prefix: str, tag: str = "") -> str:
    """One table and figure per probe task: accuracy per model and layer with its interval, beside
    the shuffled-label control; accuracies of every study seed, probe seed, fold (and language) pooled."""
    folds = summaries[0]["probe_folds"]
    parts = []
    for task, (what, chance_is) in PROBE_TASKS.items():
        by_model: dict[str, dict[int, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: {"accuracies": [], "control": [], "chance": []}))
        for summary in summaries:
            for row in summary["probes"]:
                if row["task"] == task:
                    cell = by_model[row["model"]][row["layer"]]
                    cell["accuracies"] += row["accuracies"]
                    cell["control"] += row["control"]
                    cell["chance"].append(row["chance"])
        if not by_model:
            continue
        layers = sorted({layer for per_layer in by_model.values() for layer in per_layer})
        rows, curves = [], {}
        for model, per_layer in sorted(by_model.items()):
            line, control = [f"**{model}**"], [f"{model}, shuffled labels"]
            for layer in layers:
                cell = per_layer.get(layer)
                for out, key in ((line, "accuracies"), (control, "control")):
                    ci = accuracy_interval(np.array(cell[key]), folds) if cell else None
                    out.append(f"{pct(ci.estimate)} [{pct(ci.low)}, {pct(ci.high)}]" if ci else "–")
            rows += [line, control]
            curves[model] = {layer: mean(cell["accuracies"]) for layer, cell in per_layer.items()}
        chance = mean(c for per_layer in by_model.values() for cell in per_layer.values() for c in cell["chance"])
        name = f"probes_{task}{tag}.png"
        plot_layers(curves, "probe accuracy", f"{task}: linear probe per layer", figures / name, chance)
        parts.append(f"{what}, over repeated stratified {folds}-fold cross-validation (probe seeds x folds, and the study's seeds), with a corrected "
                     f"resampled t interval (Nadeau and Bengio, 2003), beside the same probe trained on shuffled labels; {chance_is}: {pct(chance)}%.\n\n"
                     f"{markdown_table(['model'] + [f'layer {layer}' for layer in layers], rows)}\n\n![{task} probe per layer]({link_prefix}{name})")
    if not any(row["task"] == "phones" for summary in summaries for row in summary["probes"]):
        parts.append("No phone probe: it needs phone labels with timings (`--analyses phones`; the generated corpus makes them, real speech needs "
                     "an aligner's phones.jsonl).")
    return "\n\n".join(parts)


def plot_layers(curves: dict[str, dict[int, float]], ylabel: str, title: str, path: Path, chance: float | None = None) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, per_layer in curves.items():
        layers = sorted(per_layer)
        ax.plot(layers, [per_layer[layer] for layer in layers], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set_xlabel("layer (0: encoder input)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Typology


def typology_markdown(rows: Sequence[dict], iou: dict | None, sparsity: float, upstreams: Sequence[str], downstreams: Sequence[str]) -> tuple[str, dict]:
    """Correlation of mask IoU (upstream pairs) and transfer CER (upstream → other downstream) with
    URIEL+ distances, permutation p-values, Holm over every test of the table."""
    languages = list(dict.fromkeys([u for u in upstreams if u != "base"] + list(downstreams)))
    ups = [u for u in upstreams if u != "base"]
    cer = np.full((len(languages), len(languages)), np.nan)
    for (u, d), values in _mean_cer(rows, sparsity).items():
        if u in languages and d in languages:
            cer[languages.index(u), languages.index(d)] = values
    overlap = np.full_like(cer, np.nan)
    if iou is not None:
        labels = iou["labels"]
        for i, a in enumerate(ups):
            for j, b in enumerate(ups):
                if a in labels and b in labels:
                    overlap[i, j] = iou["matrix"][labels.index(a)][labels.index(b)]
    tests, out = {}, {}
    for kind in DISTANCES:
        distances = distance_matrix(languages, kind)
        for what, values, cells, permuted, both in (
            ("mask IoU", overlap, language_pairs(ups), range(len(ups)), True),
            ("transfer CER", cer, transfer_cells(languages, ups, downstreams), range(len(ups)), False),
        ):
            try:
                tests[(what, kind)] = permutation_correlation(values, distances, cells, permuted, both)
            except UsageError as err:  # too few pairs with both numbers
                out[(what, kind)] = str(err)
    marks = dict(zip(tests, holm([t.p for t in tests.values()]))) if tests else {}
    table = []
    for (what, kind), t in tests.items():
        table.append([what, kind, f"{t.r:+.2f}", f"{t.p:.3f}" + (" \\*" if marks[(what, kind)] else ""), str(t.pairs),
                      f"{t.permutations}{' (all)' if t.exact else ''}", f"{t.smallest_p:.3f}"])
    text = ("Do the study's numbers follow typological distance? Pearson r between each URIEL+ distance (angular distance of the languages' "
            "feature vectors, read offline from `urielplus`) and the mean over seeds of the tickets' IoU (pairs of upstream languages) or of the "
            "transfer CER (upstream → a different downstream language). p: two-sided, from permuting the upstream languages (all orderings when "
            "few); \\* survives Holm over the table's tests. With few languages a correlation rests on few, dependent pairs, and a p-value "
            "cannot fall below the last column's value, whatever the truth.\n\n"
            + markdown_table(["numbers", "distance", "r", "p", "pairs", "permutations", "smallest p possible"], table))
    if out:
        text += "\n\nNot computed: " + "; ".join(f"{what} vs {kind}: {why}" for (what, kind), why in out.items())
    return text, {f"{what}:{kind}": t.to_dict() | {"marked": marks[(what, kind)]} for (what, kind), t in tests.items()}


def _mean_cer(rows: Sequence[dict], sparsity: float) -> dict[tuple[str, str], float]:
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if abs(r["sparsity"] - sparsity) < 1e-9:
            cells[(r["upstream"], r["downstream"])].append(r["test_cer"])
    return {k: mean(v) for k, v in cells.items()}


# ---------------------------------------------------------------------------------------------
# The study report's sections


def analysis_markdown(results: StudyResults, upstreams: Sequence[str], downstreams: Sequence[str], figures: Path, typology: bool = True) -> str:
    """The report's sections on what the language-specific weights do: per sparsity the ablation,
    CKA and probes of every seed's tickets pooled, then the typology of the transfer CER and IoU."""
    parts = []
    for s in sorted(results.analyses):
        summaries = sorted(results.analyses[s], key=lambda summary: summary["seed"])
        seeds = ", ".join(str(summary["seed"]) for summary in summaries)
        tag = f"_{s:.2f}"
        parts.append(f"## What the language-specific weights do at {s:.0%} sparsity\n\nrun_analysis.py on the one-shot tickets of seed(s) {seeds}.\n")
        if any(summary["ablation"] for summary in summaries):
            parts.append("### Ablation\n\n" + ablation_markdown(summaries)[0] + "\n")
        if any(summary["cka"] for summary in summaries):
            parts.append("### Representational similarity\n\n" + cka_markdown(summaries, figures, "figures/", tag) + "\n")
        if any(summary["probes"] for summary in summaries):
            parts.append("### Probes\n\n" + probes_markdown(summaries, figures, "figures/", tag) + "\n")
    for s in sorted({r["sparsity"] for r in results.rows}) if typology else []:
        text, _ = typology_markdown(results.rows, results.ious.get(s), s, upstreams, downstreams)
        parts.append(f"## Typology at {s:.0%} sparsity\n\n{text}\n")
    return "\n".join(parts)
