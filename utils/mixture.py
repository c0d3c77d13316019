"""Language mixtures for self-supervised pretraining: the shares asked for, the clips drawn to meet
them (by clip count or by hours), and the record of what was actually drawn.

A mixture is drawn per split from each language's own clips, seeded: ``en=0.5 de=0.25 es=0.25``
with ``--total_hours 10`` takes about 5 h of English, 2.5 h of German and 2.5 h of Spanish. The
record (``mixture.json`` beside the pretrained model) holds the exact clips and seconds of each
language, so a study can say how imbalanced its base really was.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import UsageError
from .languages import resolve_language

SHARE_TOLERANCE = 1e-6


def parse_mixture(items: list[str] | dict[str, float]) -> dict[str, float]:
    """``["en=0.5", "de=0.25", ...]`` (or a mapping) to ``{code: share}``: known languages, each
    once, shares non-negative and summing to 1."""
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for item in items:
            code, _, share = str(item).partition("=")
            try:  # without "=" the share is empty and fails here too
                pairs.append((code, float(share)))
            except ValueError:
                raise UsageError(f"mixture entry {item!r}: expected language=share, e.g. en=0.5") from None
    if not pairs:
        raise UsageError("empty mixture: expected language=share entries, e.g. en=0.5 de=0.25 es=0.25")
    shares: dict[str, float] = {}
    for code, share in pairs:
        language = resolve_language(str(code))  # unknown codes raise with the list of known ones
        if language.code in shares:
            raise UsageError(f"mixture names {language.code!r} twice: expected each language once")
        if not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
            raise UsageError(f"mixture share {code}={share!r}: expected a number >= 0")
        shares[language.code] = float(share)
    total = sum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise UsageError(f"mixture shares {shares} sum to {total:g}: expected them to sum to 1")
    return shares


def clip_counts(shares: dict[str, float], total: int) -> dict[str, int]:
    """Clips per language summing exactly to ``total`` (largest remainder, ties in mixture order)."""
    exact = {code: share * total for code, share in shares.items()}
    counts = {code: math.floor(value) for code, value in exact.items()}
    order = sorted(exact, key=lambda code: -(exact[code] - counts[code]))
    for code in order[: total - sum(counts.values())]:
        counts[code] += 1
    return counts


@dataclass
class Drawn:
    """What one language contributed to a drawn split."""

    clips: int
    seconds: float
    share_of_clips: float
    share_of_seconds: float


def draw_mixture(
    durations: dict[str, list[float]],
    shares: dict[str, float],
    total_clips: Optional[int] = None,
    total_seconds: Optional[float] = None,
    seed: int = 0,
    what: str = "train",
) -> dict[str, list[int]]:
    """Indices into each language's clips (``durations[code]`` in seconds) meeting ``shares`` of
    ``total_clips`` or of ``total_seconds``. Each language's clips are taken in a seeded random
    order; by seconds, the prefix whose length is closest to the language's target. A total larger
    than a language holds is refused, naming the language and what it holds."""
    if (total_clips is None) == (total_seconds is None):
        raise UsageError("give exactly one of a total in clips or in hours")
    missing = [code for code in shares if code not in durations]
    if missing:
        raise UsageError(f"no {what} data for {missing}: the mixture needs every language it names")
    picked = {}
    counts = clip_counts(shares, total_clips) if total_clips is not None else None
    for code, share in shares.items():
        order = list(range(len(durations[code])))
        random.Random(f"{seed}-{code}-{what}").shuffle(order)
        if counts is not None:
            if counts[code] > len(order):
                raise UsageError(f"the {what} mixture asks for {counts[code]} {code} clips but the source holds {len(order)}: lower the total")
            picked[code] = sorted(order[: counts[code]])
            continue
        target = share * total_seconds
        available = sum(durations[code])
        if available < target * (1 - SHARE_TOLERANCE):
            raise UsageError(f"the {what} mixture asks for {target / 3600:.3g} h of {code} but the source holds {available / 3600:.3g} h: lower the total")
        cumulative, best, best_gap = 0.0, 0, target
        for k, index in enumerate(order, start=1):
            cumulative += durations[code][index]
            if abs(cumulative - target) < best_gap:
                best, best_gap = k, abs(cumulative - target)
            if cumulative >= target:
                break
        picked[code] = sorted(order[:best])
    return picked


def describe_draw(durations: dict[str, list[float]], picked: dict[str, list[int]]) -> dict[str, Drawn]:
    """Clips and seconds each language contributed, and their shares of the drawn split."""
    seconds = {code: sum(durations[code][i] for i in indices) for code, indices in picked.items()}
    total_clips = sum(len(indices) for indices in picked.values()) or 1
    total_seconds = sum(seconds.values()) or 1.0
    return {
        code: Drawn(len(indices), round(seconds[code], 3), len(indices) / total_clips, seconds[code] / total_seconds)
        for code, indices in picked.items()
    }


def mixture_record(shares: dict[str, float], total: dict, drawn: dict[str, dict[str, Drawn]]) -> dict:
    """What ``mixture.json`` holds: the shares asked for, the total, and per split what was drawn."""
    return {"requested": shares, "total": total, "drawn": {split: {code: asdict(d) for code, d in by_code.items()} for split, by_code in drawn.items()}}


def load_mixture_splits(
    data_args,
    shares: dict[str, float],
    feature_extractor,
    model_config,
    min_frames: int,
    total_clips: Optional[int] = None,
    total_hours: Optional[float] = None,
    eval_clips: int = 100,
    seed: int = 0,
):
    """Train and validation splits drawn from each language's own source in ``shares``: every
    language's clips are decoded and filtered once (cached like the CTC features), then drawn.
    ``--data_dir`` and ``--dataset_config_name`` may hold ``{language}``. Returns the two splits
    (with a ``language`` column) and the ``mixture.json`` record (with the ids drawn). Validation is drawn by clips in
    the same shares (``eval_clips`` in all, fewer where a language holds fewer)."""
    import dataclasses

    from datasets import DatasetDict, concatenate_datasets

    from .arguments import fill_language
    from .data import load_raw_splits
    from .features import vectorize_splits
    from .text import SAMPLING_RATE

    per_language = {}
    for code in shares:
        args = dataclasses.replace(
            data_args,
            data_dir=fill_language(data_args.data_dir, code, "--data_dir") if data_args.data_dir else None,
            dataset_config_name=fill_language(data_args.dataset_config_name, code, "--dataset_config_name") if data_args.dataset_config_name else None,
        )
        raw = load_raw_splits(args, resolve_language(code), wanted=("train", "validation"), require_text=False)
        per_language[code] = vectorize_splits(raw, feature_extractor, model_config, data_args, min_frames)
    out, drawn, ids = {}, {}, {}
    for split in ("train", "validation"):
        durations = {code: [n / SAMPLING_RATE for n in splits[split]["input_length"]] for code, splits in per_language.items()}
        if split == "train":
            picked = draw_mixture(durations, shares, total_clips, None if total_hours is None else total_hours * 3600, seed, split)
        else:
            counts = clip_counts(shares, eval_clips)
            capped = {code: min(counts[code], len(durations[code])) for code in shares}
            picked = {code: sorted(random.Random(f"{seed}-{code}-{split}").sample(range(len(durations[code])), capped[code])) for code in shares}
        drawn[split] = describe_draw(durations, picked)
        ids[split] = {code: [per_language[code][split]["id"][i] for i in indices] for code, indices in picked.items()}
        parts = [per_language[code][split].select(indices).add_column("language", [code] * len(indices)) for code, indices in picked.items() if indices]
        out[split] = concatenate_datasets(parts)
    total = {"clips": total_clips} if total_clips is not None else {"hours": total_hours}
    return DatasetDict(out), mixture_record(shares, total, drawn) | {"ids": ids}
