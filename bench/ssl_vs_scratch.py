#!/usr/bin/env python
"""Does self-supervised pretraining of the tiny model help at demo scale? Fine-tunes the same
language with the same steps from an SSL-pretrained base and from scratch (the baseline, in the
same run) and prints test CER and the paired difference with 95% intervals over seeds and
utterances (utils/stats.py).

    python bench/ssl_vs_scratch.py --work_dir /tmp/ssl-vs-scratch            # ~20 min on 2 cores
    python bench/ssl_vs_scratch.py --pretrain_epochs 12 --seeds 0 1          # longer pretraining, 2 seeds
    python bench/ssl_vs_scratch.py --finetune_epochs 6 --seeds 0 1 --summarise docs/bias-study/ssl-vs-scratch   # from finished runs

Steps, each a script of ours in its own process: a generated corpus (en, de, es: 1,000 training
and 200 validation/test clips each), ``run_pretrain.py`` on an en/de/es mixture of 2,000 clips
(50/25/25), then ``run_finetune.py`` on English from that base and from a random initialisation
of the same config, per fine-tuning seed. Results land in ``<work_dir>/results.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs" / "tiny-wav2vec2"
COMMON = ["--use_cpu", "True", "--disable_tqdm", "True", "--per_device_train_batch_size", "8", "--adam_beta2", "0.98", "--report_to", "none"]


def run(script: str, args: list[str], log: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def finetune_dir(work: Path, name: str, pretrain_epochs: int, finetune_epochs: int, seed: int) -> Path:
    return work / f"finetune-{name}-pt{pretrain_epochs if name == 'ssl' else 0}-ft{finetune_epochs}-seed{seed}"


def intervals(work: Path, pretrain_epochs: int, finetune_epochs: int, seeds: list[int]) -> tuple[dict, dict, object]:
    """Per start: its rates and CER interval; and SSL minus scratch, paired by seed and utterance."""
    from utils.metrics import read_predictions
    from utils.stats import Rates, cell_interval, difference_interval

    rates = {}
    for name in ("scratch", "ssl"):
        runs = []
        for seed in seeds:
            out = finetune_dir(work, name, pretrain_epochs, finetune_epochs, seed)
            results = json.loads((out / "all_results.json").read_text())
            runs.append(read_predictions(out / "predictions_test.jsonl", expect_cer=results["test_cer"]))
        rates[name] = Rates.from_seeds([([r.char_edits for r in run], [r.ref_chars for r in run]) for run in runs], seeds)
    cer = {name: cell_interval(r, "en") for name, r in rates.items()}
    return rates, cer, difference_interval({"en": rates["ssl"]}, {"en": rates["scratch"]})


def interval_lines(rates: dict, cer: dict, diff) -> list[str]:
    lines = [f"English test CER from {name:>7}: {100 * cer[name].estimate:.1f}% [{100 * cer[name].low:.1f}, {100 * cer[name].high:.1f}] "
             f"(seeds {', '.join(f'{100 * c:.1f}' for c in rates[name].per_seed())})" for name in ("scratch", "ssl")]
    lines.append(f"SSL - scratch: {100 * diff.estimate:+.1f} pp [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] "
                 f"(seeds {', '.join(f'{100 * d:+.1f}' for d in rates['ssl'].per_seed() - rates['scratch'].per_seed())}); "
                 f"ratio {cer['ssl'].estimate / cer['scratch'].estimate:.3f} (baseline: scratch, same steps)")
    return lines


def intervals_json(rates: dict, cer: dict, diff) -> dict:
    return {"test_cer": {name: {"estimate": i.estimate, "low": i.low, "high": i.high, "per_seed": list(rates[name].per_seed())} for name, i in cer.items()},
            "ssl_minus_scratch": {"estimate": diff.estimate, "low": diff.low, "high": diff.high}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/ssl-vs-scratch")
    parser.add_argument("--pretrain_epochs", type=int, default=6, help="epochs over the 2,000-clip mixture (250 updates each)")
    parser.add_argument("--finetune_epochs", type=int, default=6, help="epochs over 1,000 English clips (125 updates each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (the base is pretrained once, seed 0)")
    parser.add_argument("--summarise", metavar="DIR", help="only recompute the intervals of the finished fine-tunes in DIR (no training): "
                        "printed, written to DIR/summary.txt and into DIR/results.json")
    args = parser.parse_args()
    if args.summarise:
        folder = Path(args.summarise)
        found = intervals(folder, args.pretrain_epochs, args.finetune_epochs, args.seeds)
        lines = interval_lines(*found)
        print("\n".join(lines))
        (folder / "summary.txt").write_text("\n".join(lines) + "\n")
        results = folder / "results.json"
        if results.is_file():
            results.write_text(json.dumps(json.loads(results.read_text()) | intervals_json(*found), indent=2) + "\n")
        return

    from utils.corpus import generate_corpus

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus(str(work / "corpus"), ["en", "de", "es"], num_train=1000, num_eval=200)
    updates = args.pretrain_epochs * 250
    base = work / f"ssl-base-{args.pretrain_epochs}ep"
    seconds = {}
    if not (base / "model.safetensors").is_file():
        seconds["pretrain"] = run("run_pretrain.py", [
            "--model_name_or_path", str(TINY), "--mixture", "en=0.5", "de=0.25", "es=0.25", "--total_clips", "2000", "--eval_clips", "100",
            "--data_dir", str(work / "corpus" / "{language}"), "--output_dir", str(base), "--num_train_epochs", str(args.pretrain_epochs),
            "--mask_time_prob", "0.5", "--mask_time_length", "5", "--learning_rate", "1e-3", "--seed", "0", "--logging_steps", "50",
            # the temperature falls from 2 to 0.5 over the run, as in the wav2vec 2.0 schedule
            "--gumbel_temperature_decay", f"{0.25 ** (1 / updates):.6f}", *COMMON,
        ], work / f"pretrain-{args.pretrain_epochs}ep.log")
    log = [e for e in json.loads((base / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    for seed in args.seeds:
        for name, start in (("scratch", TINY), ("ssl", base)):
            out = finetune_dir(work, name, args.pretrain_epochs, args.finetune_epochs, seed)
            if not (out / "all_results.json").is_file():
                seconds[f"{name}-{seed}"] = run("run_finetune.py", [
                    "--language", "en", "--data_dir", str(corpus["en"]), "--model_name_or_path", str(start), "--output_dir", str(out),
                    "--num_train_epochs", str(args.finetune_epochs), "--learning_rate", "2e-3", "--warmup_steps", "50",
                    "--freeze_feature_encoder", "False", "--seed", str(seed), "--logging_steps", "50", *COMMON,
                ], out.with_suffix(".log"))
    rates, cer, diff = intervals(work, args.pretrain_epochs, args.finetune_epochs, args.seeds)
    summary = {
        "pretrain_updates": updates, "pretrain_first_log": log[0], "pretrain_last_log": log[-1], "seeds": args.seeds,
        "test_utterances": rates["ssl"].utterances, "finetune_updates": args.finetune_epochs * 125, **intervals_json(rates, cer, diff), "seconds": seconds,
    }
    (work / f"results-pt{args.pretrain_epochs}-ft{args.finetune_epochs}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"SSL pretraining: {updates} updates; contrastive loss {log[0]['contrastive_loss']:.3f} -> {log[-1]['contrastive_loss']:.3f}, "
          f"accuracy {log[0]['contrastive_accuracy']:.3f} -> {log[-1]['contrastive_accuracy']:.3f}, perplexity "
          f"{log[0]['codevector_perplexity']:.1f} -> {log[-1]['codevector_perplexity']:.1f}")
    print("\n".join(interval_lines(rates, cer, diff)))

if __name__ == "__main__":
    main()
