"""Several pretraining bases side by side: the measures of the paper's first open question (does a
balanced pretraining mixture remove the dominant language's advantage?), defined once here.

For one base at one sparsity, with every seed's runs pooled on the shared test utterances:

- **avg non-matching CER** of an upstream ticket ``u``: the mean of its CER over the downstream
  languages other than ``u`` (each language's utterances resampled independently for the interval);
- **dominant advantage**: over the pairs (``u``, ``d``) with ``u`` an upstream language other than
  the dominant one ``D`` and ``d`` a downstream language other than ``u`` and ``D``, the mean of
  CER(``u`` -> ``d``) - CER(``D`` -> ``d``). Positive: the dominant language's ticket transfers
  better. Its interval is a paired bootstrap over the same test utterances of each ``d``;
- **base - reference**: one base's dominant advantage minus the first base's, both on the same
  resampled utterances (the bases are tested on the same test sets), and per seed (seed ``k`` of
  every base starts from the same initial weights);
- **IoU with the base pruned the same way**: each language ticket's kept weights against those of
  its own pretrained base pruned at the same sparsity, beside the seed-to-seed IoU of that language
  (the noise floor of mask overlap).

Every interval covers test-set sampling only; the per-seed values and their standard deviation
beside it are the training noise, which with a few seeds is usually the larger of the two.
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

import numpy as np

from .errors import UsageError
from .iou import chance_corrected
from .report import cell_rates, cells_at, markdown_table, noise_floor, pct, plt, save_figure
from .stats import CONFIDENCE, Interval, Rates, bootstrap_interval, mean_rate_interval


def advantage_pairs(upstreams: list[str], downstreams: list[str], dominant: str) -> list[tuple[str, str]]:
    """The (other ticket, downstream language) pairs the dominant advantage averages over."""
    return [(u, d) for u in upstreams if u != dominant for d in downstreams if d not in (u, dominant)]


def _advantage(rates: dict[tuple[str, str], Rates], pairs: list[tuple[str, str]], dominant: str, idx: Optional[dict] = None) -> np.ndarray:
    return np.mean([rates[(u, d)].rate(None if idx is None else idx[d]) - rates[(dominant, d)].rate(None if idx is None else idx[d]) for u, d in pairs], axis=0)


class BaseResults:
    """One base's transfer runs at one sparsity: pooled rates per (ticket, downstream) and per-seed CERs."""

    def __init__(self, name: str, rows: list[dict], sparsity: float):
        self.name = name
        self.cells = cells_at(rows, sparsity)
        self.rates = {key: cell_rates(runs) for key, runs in self.cells.items()}
        self.seeds = sorted({r["seed"] for runs in self.cells.values() for r in runs})

    def seed_cer(self, up: str, down: str, seed: int) -> Optional[float]:
        return next((r["test_cer"] for r in self.cells.get((up, down), []) if r["seed"] == seed), None)

    def seed_advantage(self, pairs: list[tuple[str, str]], dominant: str, seed: int) -> Optional[float]:
        values = [(self.seed_cer(u, d, seed), self.seed_cer(dominant, d, seed)) for u, d in pairs]
        return None if any(a is None or b is None for a, b in values) else mean(a - b for a, b in values)


def _check_pairs(base: BaseResults, pairs: list[tuple[str, str]], dominant: str) -> None:
    missing = sorted({key for u, d in pairs for key in ((u, d), (dominant, d)) if key not in base.rates})
    if missing:
        raise UsageError(f"base {base.name!r} has no transfer results for {', '.join(f'{u}->{d}' for u, d in missing)}: expected every ticket on every downstream language")


def advantage_interval(base: BaseResults, pairs: list[tuple[str, str]], dominant: str) -> Interval:
    """The dominant advantage of one base with its paired bootstrap interval."""
    _check_pairs(base, pairs, dominant)
    strata = {d: base.rates[(dominant, d)].utterances for _, d in pairs}
    return bootstrap_interval(strata, lambda idx: _advantage(base.rates, pairs, dominant, idx))


def advantage_difference_interval(base: BaseResults, reference: BaseResults, pairs: list[tuple[str, str]], dominant: str) -> Interval:
    """``base``'s dominant advantage minus ``reference``'s, on the same resampled test utterances."""
    for b in (base, reference):
        _check_pairs(b, pairs, dominant)
    for _, d in pairs:
        ids = [[u.id for u in b.cells[(dominant, d)][0]["utterances"]] for b in (base, reference)]
        if ids[0] != ids[1]:
            raise UsageError(f"bases {base.name!r} and {reference.name!r} were tested on different {d} utterances: expected the same test set to compare them")
    strata = {d: base.rates[(dominant, d)].utterances for _, d in pairs}
    return bootstrap_interval(strata, lambda idx: _advantage(base.rates, pairs, dominant, idx) - _advantage(reference.rates, pairs, dominant, idx))


def _fmt_ci(ci: Interval, signed: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.2f}") if signed else pct
    mark = " \\*" if signed and ci.excludes_zero else ""
    return f"{f(ci.estimate)} [{f(ci.low)}, {f(ci.high)}]{mark}"


def _fmt_seeds(values: list[Optional[float]]) -> tuple[str, str]:
    shown = ", ".join("–" if v is None else f"{100 * v:+.2f}" for v in values)
    present = [v for v in values if v is not None]
    return shown, (f"{100 * stdev(present):.2f}" if len(present) > 1 else "–")


def compare_bases(
    per_base: dict[str, tuple[list[dict], dict, dict]], sparsity: float, upstreams: list[str], downstreams: list[str], dominant: str
) -> tuple[str, dict]:
    """The comparison at one sparsity as markdown, and its numbers. ``per_base`` maps a base name
    (the first is the reference) to what ``utils.grid.collect`` returned for it."""
    names = list(per_base)
    results = {name: BaseResults(name, per_base[name][0], sparsity) for name in names}
    pairs = advantage_pairs(upstreams, downstreams, dominant)
    numbers: dict = {"avg_non_matching": {}, "advantage": {}, "advantage_vs_reference": {}, "iou_vs_base": {}}
    parts = []

    # Per upstream ticket: average non-matching CER, each base a column.
    table = []
    for u in upstreams:
        line = [f"**{u}**" + (" (dominant)" if u == dominant else "")]
        for name in names:
            base = results[name]
            cells = {d: base.rates[(u, d)] for d in downstreams if d != u and (u, d) in base.rates}
            if not cells:
                line.append("–")
                continue
            ci = mean_rate_interval(cells)
            per_seed = [mean(base.seed_cer(u, d, s) for d in cells) for s in base.seeds if all(base.seed_cer(u, d, s) is not None for d in cells)]
            numbers["avg_non_matching"][f"{name}/{u}"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "per_seed": per_seed}
            spread = f" ± {pct(stdev(per_seed))}" if len(per_seed) > 1 else ""
            line.append(f"{pct(ci.estimate)}{spread} [{pct(ci.low)}, {pct(ci.high)}]")
        table.append(line)
    parts.append("Average non-matching CER (%) of each upstream ticket: mean ± seed sd [95% CI].\n\n"
                 + markdown_table(["upstream ticket"] + [f"base {n}" for n in names], table))

    # The dominant language's advantage, per base and against the reference base.
    if not pairs:
        parts.append(f"No dominant advantage: it needs an upstream language other than {dominant} and a downstream language other than both.")
    else:
        table = []
        reference = results[names[0]]
        for name in names:
            base = results[name]
            ci = advantage_interval(base, pairs, dominant)
            seeds = [base.seed_advantage(pairs, dominant, s) for s in base.seeds]
            shown, sd = _fmt_seeds(seeds)
            numbers["advantage"][name] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "per_seed": dict(zip(base.seeds, seeds))}
            table.append([f"**{name}**", _fmt_ci(ci, signed=True), shown, sd])
        for name in names[1:]:
            base = results[name]
            ci = advantage_difference_interval(base, reference, pairs, dominant)
            shared = [s for s in base.seeds if s in reference.seeds]
            diffs = [None if a is None or b is None else a - b
                     for a, b in ((base.seed_advantage(pairs, dominant, s), reference.seed_advantage(pairs, dominant, s)) for s in shared)]
            shown, sd = _fmt_seeds(diffs)
            numbers["advantage_vs_reference"][name] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "per_seed": dict(zip(shared, diffs))}
            table.append([f"{name} − {names[0]}", _fmt_ci(ci, signed=True), shown, sd])
        pair_text = ", ".join(f"{u}->{d}" for u, d in pairs)
        parts.append(
            f"Dominant advantage of **{dominant}** (pp): mean over {pair_text} of CER(ticket -> d) − CER({dominant} -> d); positive means the "
            f"{dominant} ticket transfers better. {CONFIDENCE:.0%} paired bootstrap over the same test utterances, seeds pooled; \\* where it "
            f"excludes 0. The last rows compare each base with {names[0]} on the same utterances and per seed (same initial weights).\n\n"
            + markdown_table(["base", "advantage [95% CI]", "per seed", "seed sd"], table)
        )

    # IoU with the base pruned the same way, beside the seed-to-seed noise floor.
    floors = {name: noise_floor(per_base[name][2][sparsity])[0] if sparsity in per_base[name][2] else {} for name in names}
    table = []
    for u in upstreams:
        line = [f"**{u}**"]
        for name in names:
            values = [_vs_base(f, u) for f in per_base[name][1].get(sparsity, {}).get("per_seed", []) if u in f["labels"] and "base" in f["labels"]]
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
    """Each base's dominant advantage with its interval (bar) and its per-seed values (dots)."""
    names = list(numbers["advantage"])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for i, name in enumerate(names):
        a = numbers["advantage"][name]
        ax.errorbar([i], [100 * a["estimate"]], yerr=[[100 * (a["estimate"] - a["low"])], [100 * (a["high"] - a["estimate"])]], fmt="o", capsize=6, color="black")
        seeds = [v for v in a["per_seed"].values() if v is not None]
        ax.scatter([i + 0.15] * len(seeds), [100 * v for v in seeds], marker="x", color="tab:red", label="per seed" if i == 0 else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(f"CER(other tickets) − CER({dominant} ticket), pp")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_comparison(
    study_dir: str | os.PathLike, per_base: dict[str, tuple[list[dict], dict, dict]], sparsities: list[float], upstreams: list[str],
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
        if not all(any(abs(r["sparsity"] - s) < 1e-9 for r in per_base[name][0]) for name in per_base):
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
