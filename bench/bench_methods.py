#!/usr/bin/env python
"""What IMP and PARP add to fine-tuning, at the XLS-R 300M shape (random-init, nothing downloaded).

    python bench/bench_methods.py                   # CPU; --device cuda where there is one
    python bench/bench_methods.py --batches 1 2 --seconds 10 --every 50 --paper_batch 16

- PARP's re-prune (``utils.training.RepruneCallback``: the exact global threshold over the 302M
  weights in scope, the new mask applied, the counts it logs), after every weight has moved (as
  training between re-prunes moves them) and, for the threshold's worst case, with 80% of the
  weights exactly 0; against one training step (forward,
  CTC loss, backward, AdamW) on ``--batches`` clips of ``--seconds`` s; its share of the training
  time when it runs every ``--every`` steps, at the measured batches and, by a linear fit of step
  time to batch size, at the paper's per-device batch.
- One IMP round's own work (``run_imp.py`` between two fine-tunes: read the last round's weights,
  prune within its mask, write the mask, read the rewind point back, apply the mask) against the
  same training step: how many steps' worth one round adds. IMP's real cost is the fine-tunes:
  ``rounds`` + 1 of them where one-shot pruning needs one.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_prune import random_model  # noqa: E402


def timed(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall seconds of ``repeats`` calls (after one untimed warm-up call), ``setup`` run untimed before each."""
    setup()
    fn()
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="Clips per training step measured.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each clip (FLEURS averages about 10 s).")
    parser.add_argument("--every", type=int, default=50, help="PARP's --reprune_steps.")
    parser.add_argument("--paper_batch", type=int, default=16, help="The paper's per-device batch (configs/paper.yaml).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from utils.iterative import load_weights, save_weights
    from utils.masks import Mask
    from utils.pruning import apply_mask, compute_masks, prunable_parameters
    from utils.training import RepruneCallback

    torch.manual_seed(0)
    model = random_model("300m", args.device)
    model.config.ctc_zero_infinity = True
    params = prunable_parameters(model)
    in_scope = sum(p.numel() for p in params.values())
    print(f"XLS-R 300M shape on {args.device}: {sum(p.numel() for p in model.parameters()):,} weights, {in_scope:,} in the default scope", flush=True)

    # The baseline: one training step (forward, CTC loss, backward, AdamW) per batch size.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    step_times = {}
    for batch in args.batches:
        inputs = torch.randn(batch, int(16000 * args.seconds), device=args.device)
        labels = torch.randint(1, 32, (batch, int(12 * args.seconds)), device=args.device)

        def step():
            loss = model(input_values=inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step_times[batch] = timed(step, args.repeats)
        print(f"training step, {batch} clip(s) of {args.seconds:g} s: {step_times[batch]:.2f} s", flush=True)

    # PARP's re-prune, as the callback runs it, after the training steps between two re-prunes have
    # moved every weight (pruned ones too: they are trainable), here by a small random update.
    sparsity = 0.8
    callback = RepruneCallback(compute_masks(params, [sparsity])[sparsity], sparsity, args.every)
    callback.on_train_begin(None, None, None, model=model)

    @torch.no_grad()
    def train_a_little():
        for p in params.values():
            p.add_(torch.randn_like(p), alpha=1e-4)

    reprune = timed(lambda: callback._reprune(0), args.repeats, setup=train_a_little)
    print(f"PARP re-prune of {in_scope:,} weights to {sparsity:.0%}: {reprune:.2f} s", flush=True)
    # Re-pruning with no step in between: 80% of the weights are exactly 0, one tie at the threshold.
    tied = timed(lambda: callback._reprune(0), args.repeats)
    print(f"the same with 80% of the weights exactly 0 (a tie of {round(sparsity * in_scope):,} weights at the threshold): {tied:.2f} s "
          f"({tied / reprune:.2f}x the re-prune above)", flush=True)

    # One IMP round's own work between two fine-tunes.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_weights(model, tmp / "round")
        save_weights(model, tmp / "rewind")
        mask = compute_masks(params, [0.7])[0.7]

        def imp_round():
            load_weights(model, tmp / "round")
            new = compute_masks(params, [sparsity], within=mask)[sparsity]
            Mask.save(tmp / "mask.safetensors", new, {"sparsity": sparsity, "method": "imp"})
            load_weights(model, tmp / "rewind")
            apply_mask(model, new)

        imp = timed(imp_round, args.repeats)
    print(f"IMP round's own work (read weights, prune within the mask, write it, rewind, apply): {imp:.2f} s", flush=True)

    # Ratios against the training step measured in the same run.
    batches = sorted(step_times)
    if len(batches) > 1:
        slope, intercept = np.polyfit(batches, [step_times[b] for b in batches], 1)
        step_times[args.paper_batch] = float(intercept + slope * args.paper_batch)
    print(f"\nshare of training time spent re-pruning every {args.every} steps (re-prune / ({args.every} steps + re-prune)); "
          "IMP round's own work in training steps:")
    for batch, seconds in sorted(step_times.items()):
        share = reprune / (args.every * seconds + reprune)
        what = "measured" if batch in args.batches else "linear fit to the measured batches"
        print(f"  batch {batch:3d} ({what}): step {seconds:.2f} s -> re-prune share {100 * share:.2f}%, re-prune = {reprune / seconds:.2f} steps, "
              f"IMP round's own work = {imp / seconds:.2f} steps")


if __name__ == "__main__":
    main()
