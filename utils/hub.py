"""Sharing on the Hugging Face Hub, the write side: ticket model cards, ticket pushes (model
repos), the masks dataset repo with its index table. Reading a mask from a reference is
``utils.masks.resolve_mask``'s."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar, Union

from huggingface_hub import CommitOperationAdd, DatasetCardData, EvalResult, HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError

from . import __version__
from .hub_client import HubError, hub_errors, hub_timeout
from .layout import has_local_config_only

if TYPE_CHECKING:  # data.py imports datasets: not needed to write a card
    from .data import DatasetReference
from .layout import sparsity_dirname

logger = logging.getLogger(__name__)
T = TypeVar("T")

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["file", "language", "sparsity", "method", "scope", "layerwise", "source_model", "source_revision", "ticket_repo", "sha256", "kept", "total"]


# ---------------------------------------------------------------------------------------------
# Cards

SUITE_LICENSE = "apache-2.0"


@dataclass(frozen=True)
class CardEvaluation:
    """A model's test score as its card states it: on which split of which dataset, CER and WER
    (fractions, as ``results.json`` holds them) and how many utterances."""

    dataset: DatasetReference
    cer: float
    wer: float
    samples: int


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a Hub repo rather than a local folder (the Hub accepts only repo ids
    as ``base_model``, and a local path must never reach a card)."""
    return not os.path.exists(source)


def source_license(source: str, revision: str = "main") -> str:
    """The licence a model made from ``source`` inherits: the source card's, or this suite's for
    weights it initialised itself from a config; ``other`` when the source states none."""
    if has_local_config_only(source):
        return SUITE_LICENSE
    try:
        readme = (Path(source) / "README.md" if not is_hub_id(source) else
                  Path(hf_hub_download(source, "README.md", revision=revision, etag_timeout=min(hub_timeout(), constants.HF_HUB_ETAG_TIMEOUT))))
        license = ModelCard.load(readme).data.license if readme.is_file() else None
    except (OSError, EntryNotFoundError, HubError):
        license = None
    return license or "other"


def card_metadata(model_name: str, evaluation: Optional[CardEvaluation], license: str) -> dict:
    """What every card of the suite carries in the Hub's own terms: the title (``model_name``), the
    licence, the suite's version, and with a test score a ``model-index`` the Hub shows as
    evaluation results (``datasets:`` too when the data is a Hub dataset)."""
    meta: dict = {"model_name": model_name, "license": license, "language_tickets_version": __version__}
    if evaluation is not None:
        ref = evaluation.dataset
        meta["eval_results"] = [
            EvalResult(task_type="automatic-speech-recognition", task_name="Speech Recognition", dataset_type=ref.type, dataset_name=ref.name,
                       dataset_config=ref.config, dataset_split=ref.split, metric_type=metric, metric_name=f"Test {metric.upper()} (%)",
                       metric_value=round(100 * value, 2))
            for metric, value in (("cer", evaluation.cer), ("wer", evaluation.wer))
        ]
        if ref.type not in ("audiofolder", "generated"):
            meta["datasets"] = [ref.type]
    return meta


def finish_trainer_card(readme: Union[str, os.PathLike], model_name: str, evaluation: Optional[CardEvaluation], license: str) -> None:
    """Puts ``card_metadata`` into the card the Trainer wrote (which names the validation loss
    only), keeping its training table."""
    card = ModelCard.load(readme)
    for key, value in card_metadata(model_name, evaluation, license).items():
        setattr(card.data, key, value)
    card.save(str(readme))


def write_ticket_card(ticket_dir: Union[str, os.PathLike], info: dict, evaluation: Optional[CardEvaluation] = None) -> None:
    """README.md of a ticket: metadata the Hub indexes (base model, language, tags, licence, and
    with ``--evaluate_on`` the ticket's own test score as a model-index) and how to use it."""
    language = info.get("language")
    sparsity = info["sparsity"]
    source = info["source_model"]
    hub_source = source if is_hub_id(source) else None
    title = f"{'base' if language in (None, 'base') else language}-ticket-{sparsity_dirname(sparsity)}"
    data = ModelCardData(
        base_model=hub_source,
        language=[language] if language and language != "base" else None,
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=["pruned", "lottery-ticket", "ctc", "wav2vec2", "language-tickets"],
        sparsity=sparsity,
        prune_scope=info["scope"],
        prune_method=info["method"],
        prune_layerwise=info["layerwise"],
        source_model=hub_source,
        source_revision=info.get("source_revision") if hub_source else None,
        **card_metadata(title, evaluation, source_license(source, info.get("source_revision") or "main")),
    )
    what = "the pretrained base model (the paper's control)" if language in (None, "base") else f"a model fine-tuned on language `{language}`"
    how = {
        "imp": f"iterative global magnitude pruning with rewinding ({info.get('rounds')} rounds, rewound to step {info.get('rewind_step')}, "
               "fine-tuned with the mask held)",
        "parp": f"PARP (magnitude-pruned, fine-tuned with regrowth, re-pruned every {info.get('reprune_steps')} steps and at the end)",
    }.get(info["method"], f"one-shot {'layerwise' if info['layerwise'] else 'global'} unstructured {info['method']} pruning")
    scored = ("" if evaluation is None else
              f"\nAs pruned, before any further training, it scores {evaluation.cer:.2%} CER and {evaluation.wer:.2%} WER on the "
              f"{evaluation.dataset.split} split of {evaluation.dataset.name} ({evaluation.dataset.config}, {evaluation.samples} utterances).\n")
    content = f"""---
{data.to_yaml()}
---

# Language ticket: {language or "base"} at {sparsity:.0%} sparsity

A lottery-ticket subnetwork of {what}{f" (`{hub_source}`)" if hub_source else ""}: {how} of scope `{info["scope"]}`,
{info["kept_total"]:,} of {info["total"]:,} weights kept.
{scored}
Pruned weights are stored as exact zeros in `model.safetensors`, so the ticket loads with plain transformers:

```python
from transformers import AutoModelForCTC
model = AutoModelForCTC.from_pretrained("<this repo>")
```

`mask.safetensors` holds the mask, one bit per weight, in a safetensors file that `safetensors` and
`numpy` read without this suite (the masks dataset card shows a ten-line reader).

Made with `run_prune.py` of language-tickets {__version__}, reproducing Storey, Harte & Bell (2025),
"Language Bias in Self-Supervised Learning for Automatic Speech Recognition".
"""
    ModelCard(content).save(str(Path(ticket_dir) / "README.md"))


# How to read a mask file with safetensors and numpy alone (the format: docs/mask-format.md). The
# masks dataset card and the manual show exactly this text; the tests run it in a process that
# cannot import this suite and compare it with ``Mask.load``.
MASK_READER = """import json
import numpy as np
from safetensors import safe_open

def read_mask(path):
    \"\"\"{parameter name: numpy bool array, True = kept}, and the file's metadata.\"\"\"
    with safe_open(path, framework="np") as f:
        meta = json.loads(f.metadata()["mask"])
        masks = {}
        for name, shape in meta["shapes"].items():
            data = f.get_tensor(name).tobytes()
            if meta["encodings"][name] == "zstd":  # only masks written with compression
                import zstandard
                data = zstandard.ZstdDecompressor().decompress(data)
            bits = np.unpackbits(np.frombuffer(data, np.uint8), count=int(np.prod(shape)), bitorder="little")
            masks[name] = bits.astype(bool).reshape(shape)
    return masks, meta
"""


def _masks_dataset_card(repo_id: str) -> str:
    data = DatasetCardData(
        license=SUITE_LICENSE,
        pretty_name="Language-ticket masks",
        tags=["lottery-ticket", "pruning", "masks", "language-tickets"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": INDEX_FILE}]}],
        language_tickets_version=__version__,
    )
    return f"""---
{data.to_yaml()}
---

# Language-ticket masks

Pruning masks of wav2vec2/XLS-R language tickets, one file per (language, sparsity, method, scope),
made with `run_prune.py` of language-tickets {__version__}. `{INDEX_FILE}` lists them (the dataset
viewer shows it): language, sparsity, method, scope, source model and revision, ticket repo, file,
sha256 and kept count.

Each file is a safetensors file (no pickle): one `uint8` tensor per pruned parameter, named after
its state-dict key, holding the mask bits (1 = kept) of the row-major flattened weight, packed 8
per byte in little bit order and, where that saves a tenth, zstd-compressed; a JSON `mask`
metadata entry holds the shapes, counts, scope, method, tie rule, source model and a checksum.
Read one with `safetensors` and `numpy` (and `zstandard` for compressed tensors):

```python
{MASK_READER}
from huggingface_hub import hf_hub_download
masks, meta = read_mask(hf_hub_download("{repo_id}", "masks/en/sparsity-0.80.safetensors", repo_type="dataset"))
```
"""


# ---------------------------------------------------------------------------------------------
# Pushes


COMMIT_ATTEMPTS = 3


def _moved_on(err: HfHubHTTPError) -> bool:
    """Whether the Hub refused a commit because its parent is no longer the branch head."""
    return getattr(getattr(err, "response", None), "status_code", None) in (409, 412)


def _commit_at_head(api: HfApi, repo_id: str, repo_type: str, what: str, commit: Callable[[str], T]) -> T:
    """``commit(head)``: a commit whose parent is the branch head, so that nothing landing in
    between is overwritten or committed twice. A refusal because the head moved (another push, or
    a commit of ours that landed while its answer was lost and the library retried it) means look
    again, up to COMMIT_ATTEMPTS times."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        head = api.repo_info(repo_id, repo_type=repo_type, timeout=hub_timeout()).sha
        try:
            return commit(head)
        except HfHubHTTPError as err:
            if not _moved_on(err):
                raise
            logger.warning("%s changed while pushing %s: looking again (%d/%d)", repo_id, what, attempt, COMMIT_ATTEMPTS)
    raise HubError(f"cannot push {what} to {repo_id}: it kept changing between reading it and committing ({COMMIT_ATTEMPTS} tries); "
                   "re-run when other pushes to it are done")


def push_ticket(ticket_dir: Union[str, os.PathLike], repo_id: str, token: Optional[str] = None, private: Optional[bool] = None) -> str:
    """Upload a ticket directory as a model repo. Files the repo already holds make no commit, so
    re-running after a failed push, or one that landed while its answer was lost, commits nothing twice."""
    api = HfApi(token=token)

    def upload(head: str):
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(ticket_dir),
            commit_message=f"Upload ticket from {Path(ticket_dir).name}",
            ignore_patterns=["run_signature.json", ".*"],
            parent_commit=head,
        )

    with hub_errors(repo_id, "push the ticket to"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = _commit_at_head(api, repo_id, "model", "the ticket", upload)
    return str(getattr(info, "commit_url", info))


def mask_path_in_repo(language: str, sparsity: float, method: str, scope: str, layerwise: bool) -> str:
    """``masks/<language>/sparsity-0.80.safetensors``; non-default method/scope are spelled out."""
    variant = "" if (method, scope, layerwise) == ("magnitude", "encoder_linear", False) else f"_{method}{'-layerwise' if layerwise else ''}_{scope}"
    return f"masks/{language}/{sparsity_dirname(sparsity)}{variant}.safetensors"


def _read_index(api: HfApi, repo_id: str, revision: str) -> list[dict]:
    """The index rows at one commit (never a cached copy of another). Only the Hub saying there is
    no index yet means no rows: a lookup that failed is an error, or the push would drop rows."""
    try:
        path = hf_hub_download(repo_id, INDEX_FILE, repo_type="dataset", revision=revision, token=api.token, endpoint=api.endpoint,
                               etag_timeout=min(hub_timeout(), constants.HF_HUB_ETAG_TIMEOUT))  # the shorter of both bounds
    except RemoteEntryNotFoundError:
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _index_csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["file"]):
        writer.writerow({k: row.get(k, "") for k in INDEX_COLUMNS})
    return out.getvalue().encode()


def push_mask(mask_file: Union[str, os.PathLike], repo_id: str, row: dict, token: Optional[str] = None, private: Optional[bool] = None) -> bool:
    """Add a mask to a masks dataset repo and upsert its row of ``index.csv``, in one commit.

    The index is read at the branch head and committed with that head as parent, so a push of
    another mask landing in between is never overwritten (see ``_commit_at_head``). Idempotent: a
    row already present with the same sha256 (and its file present) makes no commit, so re-running
    after a failed push, or one whose answer was lost, leaves no duplicate row and no empty commit.
    Returns whether a commit was made."""
    api = HfApi(token=token)
    row = {k: str(v) for k, v in row.items()}
    wanted = {k: row.get(k, "") for k in INDEX_COLUMNS}

    def upsert(head: str) -> bool:
        rows = _read_index(api, repo_id, head)
        if wanted in rows and api.file_exists(repo_id, row["file"], repo_type="dataset", revision=head):
            logger.info("%s already holds %s with sha256 %s: nothing to push", repo_id, row["file"], row["sha256"][:12])
            return False
        rows = [r for r in rows if r["file"] != row["file"]] + [row]
        operations = [
            CommitOperationAdd(path_in_repo=row["file"], path_or_fileobj=str(mask_file)),
            CommitOperationAdd(path_in_repo=INDEX_FILE, path_or_fileobj=_index_csv(rows)),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_masks_dataset_card(repo_id).encode()),
        ]
        api.create_commit(repo_id, operations, repo_type="dataset", commit_message=f"Add {row['file']}", parent_commit=head)
        return True

    with hub_errors(repo_id, "push the mask to"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        return _commit_at_head(api, repo_id, "dataset", row["file"], upsert)
