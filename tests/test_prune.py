"""run_prune.py end to end: tickets that plain transformers loads, and pushes to a local Hub."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from tests.conftest import ROOT, TINY_CONFIG, files_containing, run_in_process
from tests.hub_server import TOKEN, HubServer
from utils.errors import UsageError
from utils.masks import Mask, parse_reference
from utils.pruning import prunable_parameters


def run_prune(args, env=None):
    env = env or dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "run_prune.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


FRESH_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCTC
model = AutoModelForCTC.from_pretrained(sys.argv[1])
zeros = {n: (p == 0).nonzero().tolist() for n, p in model.named_parameters() if n.startswith("wav2vec2.encoder.layers")}
print(json.dumps({"ok": True, "ours": sorted(m for m in sys.modules if m.split(".")[0] == "utils")}))
torch.save({n: p for n, p in model.state_dict().items()}, sys.argv[2])
"""


def test_tickets_load_with_plain_transformers(source, tmp_path):
    out = tmp_path / "tickets"
    result = run_prune(["--model_name_or_path", str(source), "--language", "en", "--sparsity", "0.9", "0.5", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    original = Wav2Vec2ForCTC.from_pretrained(source)
    for s in (0.5, 0.9):
        ticket = out / f"sparsity-{s:.2f}"
        assert {"config.json", "model.safetensors", "mask.safetensors", "README.md", "preprocessor_config.json"} <= {p.name for p in ticket.iterdir()}
        assert not any(p.name.endswith(".bin") for p in ticket.iterdir())
        loaded = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(ticket), str(tmp_path / "sd.pt")], cwd=tmp_path,
                                capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert json.loads(loaded.stdout.strip().splitlines()[-1])["ours"] == []
        state = torch.load(tmp_path / "sd.pt")
        mask = Mask.load(ticket).bools()  # read independently of the weights
        params = prunable_parameters(original)
        assert set(mask) == set(params)
        for name, p in params.items():
            assert torch.all(state[name][~mask[name]] == 0)
            assert torch.equal(state[name][mask[name]], p.detach()[mask[name]])
        for name, p in original.state_dict().items():  # out of scope: untouched
            if name not in mask:
                assert torch.equal(state[name], p), name
        total = sum(p.numel() for p in params.values())
        assert sum(int((~m).sum()) for m in mask.values()) == round(s * total)
        card = ModelCard.load(ticket / "README.md")
        assert card.data.sparsity == s and card.data.prune_scope == "encoder_linear" and card.data.prune_method == "magnitude"
        assert card.data.language == ["en"] and {"pruned", "lottery-ticket", "ctc"} <= set(card.data.tags)
        meta = Mask.load(ticket / "mask.safetensors").metadata
        assert meta["source_model"] == str(source) and meta["language"] == "en" and meta["sparsity"] == s


def test_base_model_control_and_rerun(tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(1)
    Wav2Vec2Model(AutoConfig.from_pretrained(TINY_CONFIG)).save_pretrained(base)  # no CTC head
    Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG).save_pretrained(base)
    out = tmp_path / "ticket"
    args = ["--model_name_or_path", str(base), "--language", "base", "--sparsity", "0.8", "--output_dir", str(out)]
    assert run_prune(args).returncode == 0
    mask = Mask.load(out).bools()
    assert next(iter(mask)).startswith("wav2vec2.encoder.layers.")  # same names as fine-tuned tickets
    digest = hashlib.sha256((out / "mask.safetensors").read_bytes()).hexdigest()
    again = run_prune(args)
    assert again.returncode == 0 and "reusing it" in again.stdout
    assert hashlib.sha256((out / "mask.safetensors").read_bytes()).hexdigest() == digest


def test_bad_input_is_one_line_and_keeps_existing_tickets(source, tmp_path, capsys):
    out = tmp_path / "ticket"
    assert run_prune(["--model_name_or_path", str(source), "--sparsity", "0.8", "--output_dir", str(out)]).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [
        (["--sparsity", "1.5"], "sparsity 1.5 is outside (0, 1)"),
        (["--sparsity", "0.7"], "holds a different run (sparsity: 0.8 there, 0.7 now)"),
        (["--prune_scope", "everything"], "unknown --prune_scope 'everything'"),
        (["--method", "snip"], "unknown --method 'snip'"),
        (["--hub_mask_repo_id", "me/masks"], "--hub_mask_repo_id needs --language"),
        (["--hub_mask_repo_id", "me/../masks", "--language", "en"], "--hub_mask_repo_id 'me/../masks' is not a valid repo id"),
        (["--push_to_hub", "--hub_model_id", "me/ticket/x"], "--hub_model_id 'me/ticket/x' is not a valid repo id"),
    ]
    capsys.readouterr()
    for extra, message in cases:  # in process: each is refused before any pruning
        code = run_in_process("run_prune.py", ["--model_name_or_path", str(source), "--output_dir", str(out), *extra])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and message in last, last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "reference, parsed",
    [
        ("me/ticket", ("me/ticket", "model", "mask.safetensors", None)),
        ("me/masks:masks/en/sparsity-0.80.safetensors", ("me/masks", "dataset", "masks/en/sparsity-0.80.safetensors", None)),
        ("hf://datasets/me/masks/masks/en/sparsity-0.80.safetensors", ("me/masks", "dataset", "masks/en/sparsity-0.80.safetensors", None)),
        ("hf://me/ticket@v1", ("me/ticket", "model", "mask.safetensors", "v1")),
        ("me/ticket@abc123", ("me/ticket", "model", "mask.safetensors", "abc123")),
        ("me/ticket@refs/pr/3", ("me/ticket", "model", "mask.safetensors", "refs/pr/3")),
        ("me/masks@refs/pr/3:masks/en/a.safetensors", ("me/masks", "dataset", "masks/en/a.safetensors", "refs/pr/3")),
    ],
)
def test_mask_references(reference, parsed):
    assert parse_reference(reference) == parsed


@pytest.mark.parametrize(
    "reference, message",
    [
        ("not a repo", "is not an existing path nor a Hub reference"),
        ("a/b/c", "is not an existing path nor a Hub reference"),
        ("me/ticket@", "is not an existing path nor a Hub reference"),
        ("me/ticket@v1@v2", "is not an existing path nor a Hub reference"),
        ("me/ticket@bad rev", "is not an existing path nor a Hub reference"),
        ("-me/ticket", "names '-me/ticket', not a valid repo id"),
        ("me--x/ticket", "not a valid repo id (Cannot have -- or .."),
        ("me/" + "x" * 100, "not a valid repo id"),
        ("me/masks:../../etc/passwd", "has the path '../../etc/passwd': expected a relative path inside the repo"),
        ("me/masks:/etc/passwd", "has the path '/etc/passwd'"),
        ("hf://datasets/me/masks/a//b", "has the path 'a//b'"),
        ("hf://datasets/me/masks", "names a dataset repo but no file in it"),
    ],
)
def test_bad_references_name_the_reference_and_the_accepted_forms(reference, message):
    with pytest.raises(UsageError) as err:
        parse_reference(reference)
    text = str(err.value)
    assert message in text and repr(reference) in text and "\n" not in text
    assert "ORG/NAME[@REV]" in text or "hf://datasets/ORG/NAME/PATH" in text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet="ab-_./:@ \\%~\u00e9", max_size=24))
def test_any_reference_parses_to_a_safe_hub_path_or_one_usage_error(reference):
    try:
        repo_id, repo_type, path, revision = parse_reference(reference)
    except UsageError as err:
        assert "\n" not in str(err)
        return
    assert repo_type in ("model", "dataset") and repo_id.count("/") == 1
    assert not path.startswith("/") and ".." not in path.split("/") and "" not in path.split("/")


LOAD_FROM_HUB = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCTC
from utils.masks import Mask
model = AutoModelForCTC.from_pretrained("me/tiny-en-ticket")
a = Mask.load("me/tiny-en-ticket").bools()
b = Mask.load("me/xlsr-masks:masks/en/sparsity-0.80.safetensors").bools()
c = Mask.load("hf://datasets/me/xlsr-masks/masks/en/sparsity-0.80.safetensors").bools()
params = dict(model.named_parameters())
print(json.dumps({
    "same": all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a),
    "zeros_where_pruned": all(bool(torch.all(params[k][~a[k]] == 0)) for k in a),
}))
"""


# The card's code block, run as a user would: in a fresh interpreter that cannot import this
# suite (-I: no script folder, no PYTHONPATH), reading from the (local test) Hub.
CARD_READER_RUN = r"""
import hashlib, importlib.util, json, sys
assert importlib.util.find_spec("utils") is None, "this process must not see the suite"
exec(open(sys.argv[1]).read())  # defines read_mask and reads the card's example mask from the Hub
def digest(masks, meta):
    return {"bits": {name: [list(a.shape), hashlib.sha256(np.packbits(a.reshape(-1)).tobytes()).hexdigest()] for name, a in masks.items()}, "meta": meta}
print(json.dumps([digest(masks, meta)] + [digest(*read_mask(path)) for path in sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def scored_source(tmp_path_factory, corpus_dir):
    """A 'fine-tuned' CTC model (random weights) with the processor of the test corpus's English:
    a source whose tickets can be scored."""
    import csv

    from utils.data import build_processor
    from utils.text import build_vocab, normalize_text

    out = tmp_path_factory.mktemp("scored-source")
    with open(corpus_dir / "en" / "train" / "metadata.csv", newline="", encoding="utf-8") as f:
        texts = [normalize_text(row["transcription"], "en") for row in csv.DictReader(f)]
    processor = build_processor(build_vocab(texts), Wav2Vec2FeatureExtractor.from_pretrained(TINY_CONFIG), str(out))
    config = AutoConfig.from_pretrained(TINY_CONFIG, vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(out)
    return out


def test_push_ticket_and_mask_to_a_local_hub(scored_source, corpus_dir, tmp_path):
    import jiwer
    import numpy as np

    source = scored_source
    with HubServer() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"))
        env.pop("HF_HUB_OFFLINE", None)
        out = tmp_path / "ticket"
        common = ["--evaluate_on", "test", "--data_dir", str(corpus_dir / "en"), "--max_test_samples", "12",
                  "--model_name_or_path", str(source), "--language", "en", "--sparsity", "0.8", "--output_dir", str(out)]
        # A push that stops after the ticket (no mask repo yet), with the token given as a flag ...
        flag_only = {k: v for k, v in env.items() if k != "HF_TOKEN"}
        result = run_prune([*common, "--push_to_hub", "--hub_model_id", "me/tiny-en-ticket", "--hub_token", TOKEN], flag_only)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(hub.repo("me/tiny-en-ticket").commits) == 1 and files_containing(out, TOKEN) == []
        # ... is completed by re-running with the mask repo: no new ticket commit, one mask commit.
        full = [*common, "--push_to_hub", "--hub_model_id", "me/tiny-en-ticket", "--hub_mask_repo_id", "me/xlsr-masks"]
        result = run_prune(full, env)
        assert result.returncode == 0, result.stderr[-3000:]
        ticket_repo, mask_repo = hub.repo("me/tiny-en-ticket"), hub.repo("me/xlsr-masks", "dataset")
        assert len(ticket_repo.commits) == 1 and len(mask_repo.commits) == 1
        assert {"config.json", "model.safetensors", "mask.safetensors", "README.md"} <= set(ticket_repo.files)
        assert "run_signature.json" not in ticket_repo.files
        assert mask_repo.files["masks/en/sparsity-0.80.safetensors"] == (out / "mask.safetensors").read_bytes()
        lines = mask_repo.files["index.csv"].decode().strip().splitlines()
        assert lines[0].split(",")[:4] == ["file", "language", "sparsity", "method"]
        assert len(lines) == 2
        row = dict(zip(lines[0].split(","), lines[1].split(",")))
        meta = Mask.load(out).metadata
        assert row["sha256"] == hashlib.sha256((out / "mask.safetensors").read_bytes()).hexdigest()
        assert (row["language"], row["sparsity"], row["ticket_repo"], int(row["kept"])) == ("en", "0.80", "me/tiny-en-ticket", meta["kept_total"])
        assert "configs:" in mask_repo.files["README.md"].decode() and "index.csv" in mask_repo.files["README.md"].decode()
        # Idempotent: the same command again commits nothing anywhere.
        assert run_prune(full, env).returncode == 0
        assert len(ticket_repo.commits) == 1 and len(mask_repo.commits) == 1
        # A second language adds a row, not a duplicate.
        result = run_prune(["--model_name_or_path", str(source), "--language", "de", "--sparsity", "0.8", "--output_dir", str(tmp_path / "de"),
                            "--hub_mask_repo_id", "me/xlsr-masks", "--no_compress"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(mask_repo.files["index.csv"].decode().strip().splitlines()) == 3
        # The ticket's card: its test score as pruned, as a model-index the Hub shows, against
        # jiwer on the per-utterance rows it was scored from; no local path anywhere in it.
        card_text = ticket_repo.files["README.md"].decode()
        card = ModelCard(card_text)
        rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
        assert len(rows) == 12
        cer = jiwer.cer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
        wer = jiwer.wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
        results = {r.metric_type: r for r in card.data.eval_results}
        assert results["cer"].metric_value == round(100 * cer, 2) and results["wer"].metric_value == round(100 * wer, 2)
        assert (results["cer"].task_type, results["cer"].dataset_type, results["cer"].dataset_config, results["cer"].dataset_split) == (
            "automatic-speech-recognition", "audiofolder", "en", "test")
        assert card.data.model_name == "en-ticket-sparsity-0.80" and card.data.license == "other"  # a local source states no licence
        assert str(tmp_path) not in card_text and str(source) not in card_text and str(corpus_dir) not in card_text
        from utils import __version__

        assert card.data.language_tickets_version == __version__
        # The masks dataset card's reader, run as printed in a process that cannot import this
        # suite, reads every bit and the metadata as Mask.load does.
        reader = tmp_path / "card_reader.py"
        block = mask_repo.files["README.md"].decode().split("```python\n", 1)[1].split("```", 1)[0]
        reader.write_text(block)
        isolated = subprocess.run([sys.executable, "-I", "-c", CARD_READER_RUN, str(reader), str(tmp_path / "de" / "mask.safetensors")],
                                  cwd=tmp_path, env=dict(env, HF_HOME=str(tmp_path / "hf3")), capture_output=True, text=True, timeout=120)
        assert isolated.returncode == 0, isolated.stderr[-3000:]
        standalone = json.loads(isolated.stdout.strip().splitlines()[-1])
        for read, folder, encoding in zip(standalone, (out, tmp_path / "de"), ("zstd", "packbits")):  # both encodings
            loaded = Mask.load(folder)
            assert set(loaded.metadata["encodings"].values()) == {encoding}
            assert read["meta"] == loaded.metadata
            assert read["bits"] == {name: [list(keep.shape), hashlib.sha256(np.packbits(keep.numpy().reshape(-1)).tobytes()).hexdigest()]
                                    for name, keep in loaded.bools().items()}
        assert not [name for repo in (ticket_repo, mask_repo) for name, data in repo.files.items() if TOKEN.encode() in data]  # no pushed file holds the token
        # Everything loads back through from_pretrained and load_mask, in a fresh process.
        loaded = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, str(ROOT)], cwd=tmp_path, env=dict(env, HF_HOME=str(tmp_path / "hf2")),
                                capture_output=True, text=True, timeout=120)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {"same": True, "zeros_where_pruned": True}
        # A bad token: one line naming the repo and what to do.
        result = run_prune([*common[:-1], str(tmp_path / "other"), "--push_to_hub", "--hub_model_id", "me/other"], dict(env, HF_TOKEN="wrong"))
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert "me/other" in last and "hf auth login" in last, last
