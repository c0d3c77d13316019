"""IoU on packed bits against an independent reference on unpacked numpy bools."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from utils.iou import iou_tables, random_iou
from utils.masks import Mask
from utils.structure import group_of

SHAPES = {  # two "layers", odd sizes so tensors do not fill whole 64-bit words
    "wav2vec2.encoder.layers.0.attention.q_proj.weight": (37, 29),
    "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight": (61, 37),
    "wav2vec2.encoder.layers.1.attention.q_proj.weight": (37, 29),
    "wav2vec2.encoder.layers.1.feed_forward.intermediate_dense.weight": (61, 37),
}


def random_mask(seed: int, density: float, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.random(shape) < density for name, shape in shapes.items()}


def save(path, mask, sparsity=0.8, scope="encoder_linear"):
    Mask.save(path, {k: torch.from_numpy(v) for k, v in mask.items()}, {"sparsity": sparsity, "scope": scope})
    return str(path)


def reference_iou(a: dict, b: dict, names=None) -> float:
    names = names or list(a)
    inter = sum(int((a[n] & b[n]).sum()) for n in names)
    union = sum(int((a[n] | b[n]).sum()) for n in names)
    return inter / union


def test_pairs_layers_and_modules_match_bool_reference(tmp_path):
    masks = {label: random_mask(seed, d) for label, seed, d in (("en", 1, 0.2), ("de", 2, 0.2), ("base", 3, 0.35))}
    packed = [Mask.load(save(tmp_path / f"{label}.safetensors", m), label) for label, m in masks.items()]
    overall, detail = iou_tables(packed)
    assert len(overall) == 3
    for row in overall:
        a, b = masks[row["a"]], masks[row["b"]]
        assert row["iou"] == pytest.approx(reference_iou(a, b), abs=1e-12)
        assert row["intersection"] == sum(int((a[n] & b[n]).sum()) for n in a)
        assert row["union"] == sum(int((a[n] | b[n]).sum()) for n in a)
        da = sum(int(v.sum()) for v in a.values()) / sum(v.size for v in a.values())
        db = sum(int(v.sum()) for v in b.values()) / sum(v.size for v in b.values())
        assert row["random_iou"] == pytest.approx(da * db / (da + db - da * db))
    for row in detail:
        a, b = masks[row["a"]], masks[row["b"]]
        if row["group_kind"] == "layer":
            names = [n for n in SHAPES if f".layers.{row['group']}." in n]
        else:
            names = [n for n in SHAPES if group_of(n)[1] == row["group"]]
        assert row["iou"] == pytest.approx(reference_iou(a, b, names), abs=1e-12), row
    assert {r["group"] for r in detail if r["group_kind"] == "module"} == {"q", "ffn_in"}


def test_hand_built_masks(tmp_path):
    shapes = {"wav2vec2.encoder.layers.0.attention.k_proj.weight": (8, 8)}
    a = {n: np.zeros(s, bool) for n, s in shapes.items()}
    b = {n: np.zeros(s, bool) for n, s in shapes.items()}
    name = next(iter(shapes))
    a[name][:4] = True  # rows 0-3: 32 weights
    b[name][2:6] = True  # rows 2-5: 32 weights, rows 2-3 shared (16)
    packed = [Mask.load(save(tmp_path / "a.safetensors", a, 0.5), "a"), Mask.load(save(tmp_path / "b.safetensors", b, 0.5), "b")]
    (row,), _ = iou_tables(packed)
    assert (row["intersection"], row["union"], row["iou"]) == (16, 48, 16 / 48)
    assert row["random_iou"] == pytest.approx(0.5 / (2 - 0.5))  # d / (2 - d) for equal densities


def test_random_baseline_formula():
    assert random_iou(0.2, 0.2) == pytest.approx(0.2 / 1.8)
    assert random_iou(0.1, 0.3) == pytest.approx(0.03 / 0.37)
    rng = np.random.default_rng(0)  # and against a simulation
    a, b = rng.random(400_000) < 0.1, rng.random(400_000) < 0.1
    assert (a & b).sum() / (a | b).sum() == pytest.approx(random_iou(0.1, 0.1), rel=0.05)


def test_incomparable_masks_are_refused(tmp_path):
    en = Mask.load(save(tmp_path / "en.safetensors", random_mask(1, 0.2)), "en")
    other_shapes = dict(SHAPES, **{"wav2vec2.encoder.layers.1.attention.q_proj.weight": (29, 37)})
    cases = [
        (save(tmp_path / "shape.safetensors", random_mask(2, 0.2, other_shapes)), "cover different tensors or shapes"),
        (save(tmp_path / "scope.safetensors", random_mask(2, 0.2), scope="encoder_projection_conv"), "differ in scope"),
        (save(tmp_path / "sparsity.safetensors", random_mask(2, 0.1), sparsity=0.9), "differ in sparsity"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            iou_tables([en, Mask.load(path, "x")])


def test_run_iou_writes_tables_and_pictures(tmp_path):
    paths = {label: save(tmp_path / f"{label}.safetensors", random_mask(seed, 0.2)) for label, seed in (("en", 1), ("de", 2), ("es", 3), ("base", 4))}
    out = tmp_path / "iou"
    args = [sys.executable, str(ROOT / "run_iou.py"), "--masks", f"en={paths['en']}", f"de={paths['de']}", f"es={paths['es']}", "--base", paths["base"], "--output_dir", str(out)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "iou.json").read_text())
    assert summary["labels"] == ["en", "de", "es", "base"]
    masks = {label: random_mask(seed, 0.2) for label, seed in (("en", 1), ("de", 2), ("es", 3), ("base", 4))}
    for i, a in enumerate(summary["labels"]):
        for j, b in enumerate(summary["labels"]):
            expected = 1.0 if i == j else reference_iou(masks[a], masks[b])
            assert summary["matrix"][i][j] == pytest.approx(expected, abs=1e-12)
    assert set(summary["vs_base"]) == {"en", "de", "es"}
    assert summary["random_baseline"] == pytest.approx(summary["density"] / (2 - summary["density"]))
    assert len((out / "iou.csv").read_text().strip().splitlines()) == 1 + 6
    for png in ("iou_heatmap.png", "iou_layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([*args[:3], f"en={paths['en']}", "--output_dir", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected at least two" in bad.stderr.strip().splitlines()[-1]
    bad = subprocess.run([*args[:3], "de", "--output_dir", str(tmp_path / "bad2")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not LABEL=MASK" in bad.stderr.strip().splitlines()[-1]
