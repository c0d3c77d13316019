#!/usr/bin/env python
"""Cost of holding a mask during training: steps with HoldMaskCallback's re-masking after every
optimizer step vs the same steps without it (the baseline), in one run.

    python bench/bench_mask_hold.py                       # XLS-R-300M widths, 4 layers, CPU
    python bench/bench_mask_hold.py --layers 24 --device cuda --bf16 --seconds 10

Random-init model of XLS-R widths (nothing downloaded), synthetic clips, AdamW. Prints the mean
step time of both and the overhead ratio (target: under 2%).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.masks import compute_masks, prunable_parameters  # noqa: E402
from utils.training import HoldMaskCallback  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
                            feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=40, mask_time_prob=0.0, ctc_loss_reduction="mean")
    model = Wav2Vec2ForCTC(config).to(args.device).train()
    model.freeze_feature_encoder()
    mask = compute_masks(prunable_parameters(model), [0.8])[0.8]
    hold = HoldMaskCallback(mask)
    hold.on_train_begin(None, None, None, model=model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs = torch.randn(args.batch, int(args.seconds * 16000), device=args.device)
    labels = torch.randint(1, 40, (args.batch, int(args.seconds * 10)), device=args.device)

    def step(with_mask: bool) -> float:
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        if with_mask:
            hold.on_optimizer_step(None, None, None)
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for i in range(args.steps):  # interleaved, so drift hits both equally
        for with_mask in ((True, False) if i % 2 else (False, True)):
            times[with_mask].append(step(with_mask))
    held, free = (sorted(times[k])[len(times[k]) // 2] for k in (True, False))
    masking = []
    for _ in range(args.steps):
        start = time.perf_counter()
        hold.on_optimizer_step(None, None, None)
        masking.append(time.perf_counter() - start)
    cost = sorted(masking)[len(masking) // 2]
    weights = sum(k.numel() for k in mask.values())
    assert all(torch.all(p.detach()[~k.to(p.device)] == 0) for p, k in zip(prunable_parameters(model).values(), mask.values()))
    print(f"{args.layers} layers, {weights:,} masked weights, batch {args.batch} x {args.seconds:.0f} s, {args.device}{' bf16' if args.bf16 else ''}")
    print(f"median step without mask (baseline) {free * 1000:8.1f} ms")
    print(f"median step with mask held          {held * 1000:8.1f} ms")
    print(f"re-masking alone                    {cost * 1000:8.2f} ms = {cost / free:.2%} of a step (target < 2%)")


if __name__ == "__main__":
    main()
