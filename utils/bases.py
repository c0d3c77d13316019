"""Several pretraining bases side by side: the measures of the paper's first open question (does a
balanced pretraining mixture remove the dominant language's advantage?), defined once here.

For one base at one sparsity, every seed's runs paired by seed and by test utterance:

- **avg non-matching CER** of an upstream ticket ``u``: the mean of its CER over the downstream
  languages other than ``u``, beside the upstream model's own test CER;
- **dominant advantage**: over the pairs (``u``, ``d``) with ``u`` an upstream language other than
  the dominant one ``D`` and ``d`` a downstream language other than ``u`` and ``D``, the mean of
  CER(``u`` -> ``d``) - CER(``D`` -> ``d``). Positive: the dominant language's ticket transfers
  better;
- **adjusted for upstream quality**: a ticket from a weaker upstream model may transfer worse for
  that reason alone. The slope ``b`` of transfer CER on the upstream model's own test CER is
  estimated from the other tickets only (ordinary least squares over their per-seed runs, one
  intercept per seed and downstream language: a within-seed comparison that cannot absorb the
  dominant ticket's own difference); the adjusted advantage is the advantage minus ``b`` times the
  mean gap in upstream CER, ``mean(own CER(u) - own CER(D))``. Its interval adds the slope's
  sampling variance (times the squared gap) to the seeds' and utterances';
- **base - reference**: one base's advantage (raw and adjusted) minus the first base's, paired by
  seed (seed ``k`` of every base starts from the same initial weights) and utterance;
- **IoU with the base pruned the same way**: each language ticket's kept weights against those of
  its own pretrained base pruned at the same sparsity, beside the seed-to-seed IoU of that language.

Every interval counts training noise and test-set sampling (``utils.stats``); marks survive
Holm-Bonferroni correction over the advantage table; the table says what difference it could have
detected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

import numpy as np

from .errors import UsageError
from .iou import chance_corrected
from .records import StudyResults
from .report import per_seed_difference, cell_rates, cells_at, fmt_difference, fmt_rate, intervals_method, markdown_table, noise_floor, own_rates, pct, plt, save_figure
from .stats import ALPHA, CONFIDENCE, Interval, Term, combination_interval, detectable_line, holm_marks, mean_interval


def advantage_pairs(upstreams: list[str], downstreams: list[str], dominant: str) -> list[tuple[str, str]]:
    """The (other ticket, downstream language) pairs the dominant advantage averages over."""
    return [(u, d) for u in upstreams if u != dominant for d in downstreams if d not in (u, dominant)]


@dataclass(frozen=True)
class Slope:
    """Transfer CER per unit of upstream CER, from the other tickets: estimate, standard error, residual df."""

    estimate: float
    se: float
    df: int


class BaseResults:
    """One base's runs at one sparsity: per (ticket, downstream) and per upstream model, one row per seed."""

    def __init__(self, name: str, results: StudyResults, sparsity: float):
        self.name = name
        self.cells = cells_at(results.rows, sparsity)
        self.rates = {key: cell_rates(runs) for key, runs in self.cells.items()}
        self.own = own_rates(results.own)
        self.seeds = sorted({r["seed"] for runs in self.cells.values() for r in runs})

    def seed_value(self, terms: list[Term], seed: int) -> Optional[float]:
        """The statistic ``terms`` describe, in one seed (None when a run of that seed is missing)."""
        if not all(seed in rates.seeds for _, _, rates in terms):
            return None
        return float(sum(w * rates.of_seed(seed) for w, _, rates in terms))

    def check(self, pairs: list[tuple[str, str]], dominant: str) -> None:
        missing = sorted({key for u, d in pairs for key in ((u, d), (dominant, d)) if key not in self.rates})
        if missing:
            raise UsageError(f"base {self.name!r} has no transfer results for {', '.join(f'{u}->{d}' for u, d in missing)}: expected every ticket on every downstream language")

    def advantage_terms(self, pairs: list[tuple[str, str]], dominant: str) -> list[Term]:
        self.check(pairs, dominant)
        return [t for u, d in pairs for t in ((1 / len(pairs), d, self.rates[(u, d)]), (-1 / len(pairs), d, self.rates[(dominant, d)]))]

    def slope(self, pairs: list[tuple[str, str]]) -> Optional[Slope]:
        """OLS of the other tickets' per-seed transfer CER on their upstream model's own CER, one
        intercept per (seed, downstream language); None when the data cannot identify it."""
        import statsmodels.api as sm

        points = [(s, d, self.rates[(u, d)].of_seed(s), self.own[u].of_seed(s))
                  for u, d in pairs if u in self.own for s in self.seeds if s in self.rates[(u, d)].seeds and s in self.own[u].seeds]
        groups = sorted({(s, d) for s, d, _, _ in points})
        if len(points) < len(groups) + 2:
            return None
        design = np.array([[q] + [float((s, d) == g) for g in groups] for s, d, _, q in points])
        fit = sm.OLS(np.array([y for _, _, y, _ in points]), design).fit()
        if not np.isfinite(fit.bse[0]) or np.linalg.matrix_rank(design) < design.shape[1]:
            return None
        return Slope(float(fit.params[0]), float(fit.bse[0]), int(fit.df_resid))

    def adjusted_terms(self, pairs: list[tuple[str, str]], dominant: str, slope: Slope) -> tuple[list[Term], tuple[float, float]]:
        """The advantage minus ``slope`` x the mean upstream-CER gap, and the slope's variance component."""
        gap_terms = [t for u, _ in pairs for t in ((-slope.estimate / len(pairs), f"own:{u}", self.own[u]), (slope.estimate / len(pairs), f"own:{dominant}", self.own[dominant]))]
        gap = mean(self.own[u].rate() - self.own[dominant].rate() for u, _ in pairs)
        return self.advantage_terms(pairs, dominant) + gap_terms, (gap**2 * slope.se**2, slope.df)


def _scaled(terms: list[Term], factor: float) -> list[Term]:
    return [(w * factor, name, rates) for w, name, rates in terms]


@dataclass
class _Row:
    """One row of the advantage table: a base's advantage, or a base's minus the reference's."""

    name: str
    label: str
    sections: tuple[str, str]  # where its raw and adjusted numbers go
    seeds: list[int]
    raw: Interval
    raw_seeds: list[Optional[float]]
    adjusted: Optional[Interval] = None
    adjusted_seeds: Optional[list[Optional[float]]] = None


def _fmt_seeds(values: Optional[list[Optional[float]]]) -> tuple[str, str]:
    if values is None:
        return "–", "–"
    shown = ", ".join("–" if v is None else f"{100 * v:+.2f}" for v in values)
    present = [v for v in values if v is not None]
    return shown, (f"{100 * stdev(present):.2f}" if len(present) > 1 else "–")


def _interval_numbers(ci: Optional[Interval], marked: bool, seeds: Optional[list[Optional[float]]], names: list[int]) -> Optional[dict]:
    if ci is None:
        return None
    return ci.numbers(marked) | {"per_seed": dict(zip(names, seeds or []))}


def compare_bases(per_base: dict[str, StudyResults], sparsity: float, upstreams: list[str], downstreams: list[str], dominant: str) -> tuple[str, dict]:
    """The comparison at one sparsity as markdown, and its numbers. ``per_base`` maps a base name
    (the first is the reference) to what ``utils.grid.collect`` returned for it."""
    names = list(per_base)
    results = {name: BaseResults(name, per_base[name], sparsity) for name in names}
    pairs = advantage_pairs(upstreams, downstreams, dominant)
    numbers: dict = {"avg_non_matching": {}, "own": {}, "own_vs_reference": {}, "advantage": {}, "adjusted": {}, "slope": {}, "advantage_vs_reference": {},
                     "adjusted_vs_reference": {}, "iou_vs_base": {}}
    seeds = max(len(b.seeds) for b in results.values())
    parts = [intervals_method(seeds)]

    # Per upstream ticket: the upstream model's own CER and the average non-matching CER, per base.
    table = []
    for u in upstreams:
        line = [f"**{u}**" + (" (dominant)" if u == dominant else "")]
        for name in names:
            base = results[name]
            line.append(fmt_rate(base.own[u], u) if u in base.own else "–")
            if u in base.own:
                numbers["own"][f"{name}/{u}"] = {"estimate": float(base.own[u].rate()), "per_seed": list(base.own[u].per_seed())}
            cells = {d: base.rates[(u, d)] for d in downstreams if d != u and (u, d) in base.rates}
            if not cells:
                line.append("–")
                continue
            ci = mean_interval(cells)
            per_seed = [v for v in (base.seed_value([(1 / len(cells), d, r) for d, r in cells.items()], s) for s in base.seeds) if v is not None]
            numbers["avg_non_matching"][f"{name}/{u}"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "per_seed": per_seed}
            spread = f" ± {pct(stdev(per_seed))}" if len(per_seed) > 1 else ""
            line.append(f"{pct(ci.estimate)}{spread} [{pct(ci.low)}, {pct(ci.high)}]")
        table.append(line)
    parts.append("Per upstream ticket (%): the upstream model's own test CER on its language, and the ticket's average CER over the "
                 "downstream languages other than its own; mean ± seed sd [95% CI].\n\n"
                 + markdown_table(["upstream ticket"] + [h for n in names for h in (f"base {n}: own CER", f"base {n}: avg non-matching")], table))

    # What each base did to fine-tuning itself: the upstream models' own CER, base minus reference.
    reference = results[names[0]]
    effects = [(name, u, combination_interval([(1.0, u, results[name].own[u]), (-1.0, u, reference.own[u])]),
                per_seed_difference(results[name].own[u], reference.own[u]))
               for name in names[1:] for u in upstreams if u in results[name].own and u in reference.own]
    if effects:
        flags = holm_marks([ci for _, _, ci, _ in effects])
        table = [[f"**{u}**", f"{name} − {names[0]}", fmt_difference(ci, flag), ", ".join(f"{100 * v:+.2f}" for v in per_seed)]
                 for (name, u, ci, per_seed), flag in zip(effects, flags)]
        for (name, u, ci, per_seed), flag in zip(effects, flags):
            numbers["own_vs_reference"][f"{name}/{u}"] = ci.numbers(flag) | {"per_seed": per_seed}
        parts.append("The base's effect on fine-tuning itself: each upstream model's own test CER on the other base minus on the reference base "
                     "(pp; negative: the other base fine-tunes to a lower CER), paired by seed and utterance"
                     + (f"; \\* survives Holm-Bonferroni over these {len(effects)}." if min(ci.seeds for _, _, ci, _ in effects) > 1 else ".")
                     + "\n\n" + markdown_table(["upstream model", "bases", "own CER difference [95% CI]", "per seed"], table)
                     + "\n\n" + detectable_line([ci for _, _, ci, _ in effects]))

    # The dominant language's advantage, raw and adjusted, per base and against the reference base.
    if not pairs:
        parts.append(f"No dominant advantage: it needs an upstream language other than {dominant} and a downstream language other than both.")
    else:
        rows: list[_Row] = []
        adjusted: dict[str, tuple[list[Term], tuple[float, float]]] = {}
        for name in names:
            base = results[name]
            terms = base.advantage_terms(pairs, dominant)
            row = _Row(name, f"**{name}**", ("advantage", "adjusted"), base.seeds, combination_interval(terms), [base.seed_value(terms, s) for s in base.seeds])
            slope = base.slope(pairs) if dominant in base.own else None
            if slope is not None:
                numbers["slope"][name] = {"estimate": slope.estimate, "se": slope.se, "df": slope.df}
                adjusted[name] = base.adjusted_terms(pairs, dominant, slope)
                row.adjusted = combination_interval(adjusted[name][0], extra=[adjusted[name][1]])
                row.adjusted_seeds = [base.seed_value(adjusted[name][0], s) for s in base.seeds]
            rows.append(row)
        for name in names[1:]:
            base = results[name]
            shared = [s for s in base.seeds if s in reference.seeds]
            for _, d in pairs:
                ids = [[u.id for u in b.cells[(dominant, d)][0]["utterances"]] for b in (base, reference)]
                if ids[0] != ids[1]:
                    raise UsageError(f"bases {base.name!r} and {reference.name!r} were tested on different {d} utterances: expected the same test set to compare them")
            terms = base.advantage_terms(pairs, dominant) + _scaled(reference.advantage_terms(pairs, dominant), -1)
            row = _Row(name, f"{name} − {names[0]}", ("advantage_vs_reference", "adjusted_vs_reference"), shared, combination_interval(terms),
                       [base.seed_value(terms, s) for s in shared])
            if name in adjusted and names[0] in adjusted:
                terms = adjusted[name][0] + _scaled(adjusted[names[0]][0], -1)
                row.adjusted = combination_interval(terms, extra=[adjusted[name][1], adjusted[names[0]][1]])
                row.adjusted_seeds = [base.seed_value(terms, s) for s in shared]
            rows.append(row)
        family = [(i, kind) for i, row in enumerate(rows) for kind in ("raw", "adjusted") if getattr(row, kind) is not None]
        intervals = [getattr(rows[i], kind) for i, kind in family]
        marked = dict(zip(family, holm_marks(intervals)))
        table = []
        for i, row in enumerate(rows):
            numbers[row.sections[0]][row.name] = _interval_numbers(row.raw, marked[(i, "raw")], row.raw_seeds, row.seeds)
            numbers[row.sections[1]][row.name] = _interval_numbers(row.adjusted, marked.get((i, "adjusted"), False), row.adjusted_seeds, row.seeds)
            raw_seeds, sd = _fmt_seeds(row.raw_seeds)
            adj_seeds, adj_sd = _fmt_seeds(row.adjusted_seeds)
            table.append([row.label, fmt_difference(row.raw, marked[(i, "raw")]), raw_seeds, sd,
                          fmt_difference(row.adjusted, marked[(i, "adjusted")]) if row.adjusted else "–", adj_seeds, adj_sd])
        pair_text = ", ".join(f"{u}->{d}" for u, d in pairs)
        slopes = "; ".join(f"{n}: {v['estimate']:.2f} (se {v['se']:.2f}, {v['df']} df)" for n, v in numbers["slope"].items())
        parts.append(
            f"Dominant advantage of **{dominant}** (pp): mean over {pair_text} of CER(ticket -> d) − CER({dominant} -> d); positive means the "
            f"{dominant} ticket transfers better. Adjusted: minus the slope of transfer CER on the upstream model's own CER (fitted on the other "
            f"tickets, within seed and downstream language) times the mean gap in own CER"
            + (f" (slope per base: {slopes})" if slopes else " (not identified here: it needs two other tickets and enough runs)")
            + f". The last rows compare each base with {names[0]}, paired by seed (same initial weights) and utterance. "
            + (f"\\* survives Holm-Bonferroni correction (family-wise {ALPHA:g}) over the table's {len(family)} intervals."
               if min(ci.seeds for ci in intervals) > 1 else "No marks: with one seed the intervals miss training noise.")
            + "\n\n" + markdown_table(["base", "advantage [95% CI]", "per seed", "seed sd", "adjusted [95% CI]", "per seed", "seed sd"], table)
            + "\n\n" + detectable_line(intervals)
        )

    # IoU with the base pruned the same way, beside the seed-to-seed noise floor.
    floors = {name: noise_floor(per_base[name].seed_ious[sparsity])[0] if sparsity in per_base[name].seed_ious else {} for name in names}
    table = []
    for u in upstreams:
        line = [f"**{u}**"]
        for name in names:
            values = [_vs_base(f, u) for f in per_base[name].ious.get(sparsity, {}).get("per_seed", []) if u in f["labels"] and "base" in f["labels"]]
            floor = floors[name].get(u, {}).get("seed_to_seed", [])
            if not values:
                line += ["–", "–"]
                continue
            ious = [v for v, _ in values]
            cc = [chance_corrected(v, r) for v, r in values]
            numbers["iou_vs_base"][f"{name}/{u}"] = {"mean": mean(ious), "per_seed": ious, "seed_to_seed": [r["iou"] for r in floor]}
            span = f" [{pct(min(ious))}, {pct(max(ious))}]" if len(ious) > 1 else ""
            line.append(f"{pct(mean(ious))}{span} ({pct(mean(cc))})")
            line.append(f"{pct(mean(r['iou'] for r in floor))}" if floor else "–")
        table.append(line)
    header = ["ticket"] + [h for n in names for h in (f"{n}: IoU vs base (chance-corr.)", f"{n}: same language, other seed")]
    parts.append("IoU (%) of each language ticket with its own base pruned the same way: mean [min, max] over seeds (chance-corrected mean), "
                 "beside the IoU of the same language's tickets across seeds (the noise floor).\n\n" + markdown_table(header, table))
    return "\n\n".join(parts), numbers


def _vs_base(iou: dict, label: str) -> tuple[float, float]:
    """(IoU, random-mask IoU) of ``label``'s ticket with the base's in one seed's IoU summary."""
    i, j = iou["labels"].index(label), iou["labels"].index("base")
    return iou["matrix"][i][j], iou["random_matrix"][i][j]


def plot_advantage(numbers: dict, dominant: str, title: str, path: str | os.PathLike) -> None:
    """Each base's dominant advantage, raw and adjusted for upstream quality: the estimate with its
    interval (seeds and utterances) and the per-seed values beside it."""
    names = list(numbers["advantage"])
    fig, ax = plt.subplots(figsize=(2.2 * len(names) + 2, 4.2))
    for i, name in enumerate(names):
        for offset, kind, colour in ((-0.15, "advantage", "black"), (0.15, "adjusted", "tab:blue")):
            a = numbers[kind].get(name)
            if not a:
                continue
            label = ("raw" if kind == "advantage" else "adjusted for upstream CER") if i == 0 else None
            ax.errorbar([i + offset], [100 * a["estimate"]], yerr=[[100 * (a["estimate"] - a["low"])], [100 * (a["high"] - a["estimate"])]],
                        fmt="o", capsize=6, color=colour, label=label)
            seeds = [v for v in a["per_seed"].values() if v is not None]
            ax.scatter([i + offset + 0.07] * len(seeds), [100 * v for v in seeds], marker="x", color=colour, alpha=0.7,
                       label="per seed" if i == 0 and kind == "advantage" else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(f"CER(other tickets) − CER({dominant} ticket), pp")
    ax.set_title(f"{title}\n{CONFIDENCE:.0%} intervals over seeds and utterances; x: per seed", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_comparison(
    study_dir: str | os.PathLike, per_base: dict[str, StudyResults], sparsities: list[float], upstreams: list[str],
    downstreams: list[str], dominant: str, bases: dict[str, dict], title: str, note: Optional[str] = None,
) -> tuple[Path, dict]:
    """The top-level REPORT.md of a study with several bases (the config's ``bases``: each a
    pretraining ``mixture`` or a ``model``); each base's own report is linked."""
    from .runs import atomic_open

    study_dir = Path(study_dir)
    (study_dir / "figures").mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"] + ([note + "\n"] if note else [])
    origins = "; ".join(f"**{name}**: " + (", ".join(f"{code} {share:.0%}" for code, share in base["mixture"].items()) if "mixture" in base
                                          else f"`{base['model']}`") for name, base in bases.items())
    kind = "self-supervised pretraining mixtures" if all("mixture" in base for base in bases.values()) else "pretraining mixtures, or the models they start from"
    parts.append(f"Bases ({kind}): {origins}. Each base's full study: "
                 + ", ".join(f"[base-{name}/REPORT.md](base-{name}/REPORT.md)" for name in bases) + ".\n")
    parts.append(__doc__.split("\n\n", 1)[1].strip().replace("``", "`") + "\n")
    numbers = {}
    for s in sparsities:
        if not all(any(abs(r["sparsity"] - s) < 1e-9 for r in per_base[name].rows) for name in per_base):
            continue
        text, numbers[s] = compare_bases(per_base, s, upstreams, downstreams, dominant)
        parts.append(f"## Sparsity {s:.0%}\n\n{text}\n")
        if numbers[s]["advantage"]:
            figure = f"figures/advantage_{s:.2f}.png"
            plot_advantage(numbers[s], dominant, f"{dominant} advantage at {s:.0%} sparsity", study_dir / figure)
            parts.append(f"![dominant advantage]({figure})\n")
    path = study_dir / "REPORT.md"
    with atomic_open(path) as f:
        f.write("\n".join(parts))
    return path, numbers
