#!/usr/bin/env python
"""The training path measured (CPU here; ``--device cuda`` where there is one).

    python bench/bench_training.py overhead   # CTCTrainer vs a bare PyTorch loop, same batches and model
    python bench/bench_training.py padding    # padded frames: length-grouped sampler vs random batches
    python bench/bench_training.py shape      # XLS-R-300M shape through run_prune.py and run_transfer.py
    python bench/bench_training.py shape --shapes 300m 1b
    python bench/bench_training.py cache      # time to the first training step: cold vs cached features

Each prints its figures and the ratio against the named baseline measured in the same run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = {  # the published encoder shapes; conv_dim (512,)*7 as in XLS-R
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "1b": dict(hidden_size=1280, num_hidden_layers=48, num_attention_heads=16, intermediate_size=5120),
}
WIDTHS = {
    "tiny": dict(config="configs/tiny-wav2vec2"),
    "xlsr-width": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7),
}


# ---------------------------------------------------------------------------------------------
# Trainer overhead


def _model(width: str, vocab: int):
    from transformers import AutoConfig, Wav2Vec2Config, Wav2Vec2ForCTC

    spec = WIDTHS[width]
    if "config" in spec:
        config = AutoConfig.from_pretrained(ROOT / spec["config"], vocab_size=vocab)
    else:
        config = Wav2Vec2Config(**{k: v for k, v in spec.items()}, vocab_size=vocab, feat_extract_norm="layer", do_stable_layer_norm=True)
    config.update({"mask_time_prob": 0.0, "layerdrop": 0.0, "ctc_zero_infinity": True, "pad_token_id": 0})
    return Wav2Vec2ForCTC(config)


def overhead(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from utils.training import CTCTrainer, CTCTrainingArguments

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    lengths = rng.integers(16000 * 2, 16000 * 4, n)
    data = Dataset.from_dict({
        "input_values": [rng.standard_normal(int(k)).astype(np.float32) for k in lengths],
        "labels": [rng.integers(1, 30, int(k) // 16000 * 8).tolist() for k in lengths],
        "input_length": lengths.tolist(),
    })

    def collate(rows):
        longest = max(len(r["input_values"]) for r in rows)
        values = torch.zeros(len(rows), longest)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        labels = torch.full((len(rows), max(len(r["labels"]) for r in rows)), -100)
        for i, r in enumerate(rows):
            values[i, : len(r["input_values"])] = torch.tensor(r["input_values"])
            mask[i, : len(r["input_values"])] = 1
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        return {"input_values": values, "attention_mask": mask, "labels": labels}

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    def steady(ends: list[float]) -> float:
        """Seconds per step after the first ``WARM`` steps (setup and first-touch costs excluded)."""
        return (ends[-1] - ends[WARM - 1]) / (len(ends) - WARM)

    WARM = 3
    for width in args.widths:
        results, per_step = {}, {}
        for path in ("bare", "trainer", "bare", "trainer"):  # alternated, the best of two kept
            set_seed(0)
            model = _model(width, 32).to(args.device)
            optimizer_args = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
            if path == "bare":
                loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, collate_fn=collate)
                optimizer = torch.optim.AdamW(model.parameters(), **optimizer_args)
                model.train()
                ends = []
                start = time.perf_counter()
                for batch in loader:
                    loss = model(**{k: v.to(args.device) for k, v in batch.items()}).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
                    ends.append(time.perf_counter())
                seconds = time.perf_counter() - start
            else:
                with tempfile.TemporaryDirectory() as out:
                    training = CTCTrainingArguments(
                        output_dir=out, per_device_train_batch_size=args.batch, learning_rate=1e-4, adam_beta2=0.98, num_train_epochs=1,
                        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, train_sampling_strategy="sequential",
                        report_to="none", disable_tqdm=True, logging_strategy="no", use_cpu=args.device == "cpu", lr_scheduler_type="constant",
                        dataloader_num_workers=0,
                    )
                    clock = StepClock()
                    trainer = CTCTrainer(model=model, args=training, train_dataset=data, data_collator=collate, callbacks=[clock])
                    start = time.perf_counter()
                    trainer.train()
                    seconds, ends = time.perf_counter() - start, clock.ends
            results[path] = min(results.get(path, math.inf), seconds)
            per_step[path] = min(per_step.get(path, math.inf), steady(ends))
        ratio, steady_ratio = results["trainer"] / results["bare"], per_step["trainer"] / per_step["bare"]
        print(f"{width:>10}: {args.steps} steps of {args.batch} clips (2-4 s): whole run bare loop {results['bare']:.2f} s, CTCTrainer "
              f"{results['trainer']:.2f} s -> {ratio:.3f} ({100 * (ratio - 1):+.1f}%); per step after {WARM}: bare {1000 * per_step['bare']:.0f} ms, "
              f"CTCTrainer {1000 * per_step['trainer']:.0f} ms -> {steady_ratio:.3f} ({100 * (steady_ratio - 1):+.1f}%)", flush=True)


# ---------------------------------------------------------------------------------------------
# Padding


def padding(args) -> None:
    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = np.random.default_rng(0)
    distributions = {
        # the generated corpus: 2-5 espeak words, measured on the demo corpus when it exists
        "generated": _generated_lengths(rng),
        # FLEURS-like: read sentences, mean ~11 s, 2-30 s (lognormal fit of FLEURS durations)
        "fleurs-like": np.clip(rng.lognormal(np.log(10.5), 0.35, 3000), 2.0, 30.0) * 16000,
    }
    for name, lengths in distributions.items():
        lengths = lengths.astype(int).tolist()
        generator = torch.Generator().manual_seed(0)
        random_order = list(RandomSampler(range(len(lengths)), generator=generator))
        grouped = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=torch.Generator().manual_seed(0)))
        fractions = {label: _padded_fraction(order, lengths, args.batch) for label, order in (("random", random_order), ("length-grouped", grouped))}
        print(f"{name:>12}: {len(lengths)} clips, mean {np.mean(lengths) / 16000:.1f} s, batch {args.batch}: padded frames random "
              f"{100 * fractions['random']:.1f}%, length-grouped {100 * fractions['length-grouped']:.1f}% -> "
              f"{fractions['random'] / max(fractions['length-grouped'], 1e-9):.1f}x fewer", flush=True)


def _generated_lengths(rng) -> np.ndarray:
    corpus = ROOT / "demo_output" / "corpus" / "en" / "train"
    if corpus.is_dir():
        import soundfile as sf

        return np.array([sf.info(str(p)).frames for p in sorted(corpus.glob("*.wav"))])
    return np.clip(rng.normal(1.6, 0.5, 2000), 0.5, 3.5) * 16000  # what the demo corpus measured: 1.6 +- 0.5 s


def _padded_fraction(order: list[int], lengths: list[int], batch: int) -> float:
    real = padded = 0
    for i in range(0, len(order), batch):
        chunk = [lengths[j] for j in order[i : i + batch]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded


# ---------------------------------------------------------------------------------------------
# The real shape end to end


def shape(args) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from utils.corpus import generate_corpus
    from utils.data import build_processor
    from utils.text import build_vocab

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-shape-"))
    corpus = generate_corpus(str(work / "corpus"), ["it"], num_train=8, num_eval=4, vocab_size=40)["it"]
    texts = [line.split(",")[1] for line in (corpus / "train" / "metadata.csv").read_text().splitlines()[1:]]
    for name in args.shapes:
        model_dir = work / f"xlsr-{name}"
        if not (model_dir / "model.safetensors").is_file():
            processor = build_processor(build_vocab(texts), Wav2Vec2FeatureExtractor(return_attention_mask=True), str(model_dir))
            config = Wav2Vec2Config(**SHAPES[name], conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                                    vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id, mask_time_prob=0.0)
            Wav2Vec2ForCTC(config).save_pretrained(model_dir)
        ticket = work / f"ticket-{name}"
        prune = _timed([sys.executable, str(ROOT / "run_prune.py"), "--model_name_or_path", str(model_dir), "--language", "it",
                        "--sparsity", "0.8", "--output_dir", str(ticket)])
        transfer_dir = work / f"transfer-{name}"
        transfer = _timed([sys.executable, str(ROOT / "run_transfer.py"), "--upstream", "it", "--downstream", "it", "--sparsity", "0.8",
                           "--ticket", str(ticket), "--data_dir", str(corpus), "--output_dir", str(transfer_dir), "--train_epochs", "1",
                           "--per_device_train_batch_size", "2", "--use_cpu", str(args.device == "cpu"), "--disable_tqdm", "True",
                           "--save_total_limit", "1", "--report_to", "none"])
        results = json.loads((transfer_dir / "results.json").read_text()) if (transfer_dir / "results.json").is_file() else {}
        print(f"{name}: run_prune.py {prune['seconds']:.1f} s, peak RSS {prune['peak_gb']:.1f} GB, ticket {_size(ticket):.2f} GB "
              f"(exit {prune['returncode']}); run_transfer.py {results.get('steps', '?')} steps {transfer['seconds']:.1f} s, peak RSS "
              f"{transfer['peak_gb']:.1f} GB, output {_size(transfer_dir):.2f} GB (exit {transfer['returncode']}); mask held: "
              f"{results.get('mask_held')}, measured sparsity {results.get('measured_sparsity', float('nan')):.4f}", flush=True)


def cache(args) -> None:
    """Two fine-tuning runs of the same language into different output dirs sharing one datasets
    cache: the first computes the features, the second loads them. Each reports how long after its
    process started it was ready to train (``startup_seconds`` of train_results.json)."""
    from utils.corpus import generate_corpus

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-cache-"))
    corpus = generate_corpus(str(work / "corpus"), ["en"], num_train=args.clips, num_eval=100, vocab_size=200)["en"]
    env = dict(os.environ, HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    startup = []
    for run in ("first", "second"):
        out = work / f"run-{run}"
        subprocess.run([sys.executable, str(ROOT / "run_finetune.py"), "--language", "en", "--data_dir", str(corpus), "--output_dir", str(out),
                        "--model_name_or_path", str(ROOT / "configs" / "tiny-wav2vec2"), "--max_steps", "1", "--use_cpu", "--report_to", "none",
                        "--disable_tqdm", "True", "--freeze_feature_encoder", "False"], cwd=ROOT, env=env, check=True, capture_output=True)
        startup.append(json.loads((out / "train_results.json").read_text())["startup_seconds"])
    print(f"{args.clips} training + 200 eval clips: ready to train after {startup[0]:.1f} s (features computed), "
          f"{startup[1]:.1f} s (features cached) -> {startup[0] / startup[1]:.1f}x sooner", flush=True)


def _timed(command: list[str]) -> dict:
    """Wall time and peak resident memory of a child process (polled every 0.1 s with psutil)."""
    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        child, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, child.memory_info().rss + sum(c.memory_info().rss for c in child.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.1)
        if proc.returncode:
            log.seek(0)
            print(log.read()[-3000:], file=sys.stderr)
    return {"seconds": time.perf_counter() - start, "peak_gb": peak / 1024**3, "returncode": proc.returncode}


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "padding", "shape", "cache"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--shapes", nargs="+", default=["300m"], choices=list(SHAPES))
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--clips", type=int, default=1000, help="cache: training clips")
    args = parser.parse_args()
    {"overhead": overhead, "padding": padding, "shape": shape, "cache": cache}[args.what](args)


if __name__ == "__main__":
    main()
