"""Sharing on the Hugging Face Hub: ticket model cards, ticket pushes (model repos), the masks
dataset repo with its index table, and the references ``load_mask`` accepts.

Mask references:
- a local path: a mask file, or a ticket directory holding ``mask.safetensors``;
- ``ORG/NAME``: a ticket model repo (its ``mask.safetensors``);
- ``ORG/NAME:PATH``: a file in a masks *dataset* repo, e.g. ``me/xlsr-masks:masks/en/sparsity-0.80.safetensors``;
- ``hf://ORG/NAME[/PATH]`` (model repo) or ``hf://datasets/ORG/NAME/PATH`` (dataset repo), the
  URL form ``huggingface_hub``'s file system uses. ``@REVISION`` may follow the repo name.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, DatasetCardData, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from .masks import MASK_FILE

logger = logging.getLogger(__name__)

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["file", "language", "sparsity", "method", "scope", "layerwise", "source_model", "source_revision", "ticket_repo", "sha256", "kept", "total"]
_REPO = r"[\w.-]+/[\w.-]+"


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo and what to do."""


def _explain(err: Exception, repo_id: str, action: str) -> HubError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        hint = "check the repo id, and that your token can see it"
    elif status in (401, 403):
        hint = "log in with `hf auth login` or pass --hub_token with write access"
    else:
        hint = "check your network and HF_ENDPOINT, then re-run: finished steps are skipped"
    return HubError(f"cannot {action} {repo_id} (HTTP {status or '?'}: {type(err).__name__}): {hint}")


# ---------------------------------------------------------------------------------------------
# References


def parse_reference(reference: str) -> tuple[str, str, str, Optional[str]]:
    """``(repo_id, repo_type, path_in_repo, revision)`` of a Hub mask reference."""
    ref = reference.strip()
    repo_type = "model"
    if ref.startswith("hf://"):
        ref = ref[len("hf://") :]
        if ref.startswith("datasets/"):
            repo_type, ref = "dataset", ref[len("datasets/") :]
        match = re.fullmatch(rf"({_REPO})(?:@([\w.-]+))?(?:/(.+))?", ref)
        if not match:
            raise ValueError(f"mask reference {reference!r} is not hf://[datasets/]ORG/NAME[@REV][/PATH]")
        repo_id, revision, path = match.groups()
        if repo_type == "dataset" and not path:
            raise ValueError(f"mask reference {reference!r} names a dataset repo but no file in it: expected hf://datasets/ORG/NAME/PATH")
        return repo_id, repo_type, path or MASK_FILE, revision
    match = re.fullmatch(rf"({_REPO})(?:@([\w.-]+))?(?::(.+))?", ref)
    if not match:
        raise ValueError(
            f"mask reference {reference!r} is not an existing path, ORG/NAME (ticket repo), ORG/NAME:PATH (masks dataset) or hf://..."
        )
    repo_id, revision, path = match.groups()
    return repo_id, ("dataset" if path else "model"), path or MASK_FILE, revision


def resolve_mask(reference: Union[str, os.PathLike]) -> Path:
    """A local path to the mask file a reference names, downloading (and caching) Hub files."""
    local = Path(os.path.expanduser(str(reference)))
    if local.is_dir():
        if not (local / MASK_FILE).is_file():
            raise FileNotFoundError(f"{local} holds no {MASK_FILE}: expected a ticket directory written by run_prune.py")
        return local / MASK_FILE
    if local.is_file():
        return local
    repo_id, repo_type, path, revision = parse_reference(str(reference))
    try:
        return Path(hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision))
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{repo_type} repo {repo_id} has no file {path!r} (from reference {str(reference)!r})") from err
    except (HfHubHTTPError, RepositoryNotFoundError) as err:
        raise _explain(err, repo_id, f"download {path} from") from err
    except Exception as err:  # offline / no such local path / network: all mean "not found"
        raise FileNotFoundError(f"mask {str(reference)!r} is neither a local path nor reachable on the Hub ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------
# Cards


def write_ticket_card(ticket_dir: Union[str, os.PathLike], info: dict) -> None:
    """README.md of a ticket: metadata the Hub indexes (base model, language, tags...) and a usage note."""
    language = info.get("language")
    sparsity = info["sparsity"]
    source_is_local = os.path.exists(info["source_model"])
    data = ModelCardData(
        base_model=None if source_is_local else info["source_model"],  # the Hub only accepts repo ids here
        language=[language] if language and language != "base" else None,
        datasets=[info["dataset"]] if info.get("dataset") else None,
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=["pruned", "lottery-ticket", "ctc", "wav2vec2", "language-tickets"],
        sparsity=sparsity,
        prune_scope=info["scope"],
        prune_method=info["method"],
        prune_layerwise=info["layerwise"],
        source_model=info["source_model"],
        source_revision=info.get("source_revision"),
    )
    what = "the pretrained base model (the paper's control)" if language in (None, "base") else f"a model fine-tuned on language `{language}`"
    content = f"""---
{data.to_yaml()}
---

# Language ticket: {info['source_model']} at {sparsity:.0%} sparsity

A lottery-ticket subnetwork of {what}: one-shot {"layerwise" if info["layerwise"] else "global"} unstructured
{info["method"]} pruning of scope `{info["scope"]}`, {info["kept_total"]:,} of {info["total"]:,} weights kept.
Pruned weights are stored as exact zeros in `model.safetensors`, so the ticket loads with plain transformers:

```python
from transformers import AutoModelForCTC
model = AutoModelForCTC.from_pretrained("<this repo>")
```

`mask.safetensors` holds the mask (1 bit per weight; see the language-tickets README for the format):

```python
from utils.masks import load_mask   # from the language-tickets repository
mask = load_mask("<this repo>")     # {{parameter name: BoolTensor}}, True = kept
```

Made with `run_prune.py` of language-tickets, reproducing Storey, Harte & Bell (2025),
"Language Bias in Self-Supervised Learning for Automatic Speech Recognition".
"""
    ModelCard(content).save(str(Path(ticket_dir) / "README.md"))


def _masks_dataset_card(repo_id: str) -> str:
    data = DatasetCardData(
        tags=["lottery-ticket", "pruning", "masks", "language-tickets"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": INDEX_FILE}]}],
    )
    return f"""---
{data.to_yaml()}
---

# Language-ticket masks

Pruning masks of wav2vec2/XLS-R language tickets, one file per (language, sparsity, method, scope),
made with `run_prune.py` of language-tickets. `{INDEX_FILE}` lists them (the dataset viewer shows
it): language, sparsity, method, scope, source model and revision, ticket repo, file, sha256 and
kept count.

```python
from utils.masks import load_mask
mask = load_mask("{repo_id}:masks/en/sparsity-0.80.safetensors")  # True = kept
```

Each file is a safetensors file of bit-packed masks, one tensor per pruned parameter named after its
state-dict key, with a JSON `mask` metadata entry (shapes, counts, scope, method, tie rule,
source model, checksum). No pickle.
"""


# ---------------------------------------------------------------------------------------------
# Pushes


def push_ticket(ticket_dir: Union[str, os.PathLike], repo_id: str, token: Optional[str] = None, private: Optional[bool] = None) -> str:
    """Upload a ticket directory as a model repo; unchanged files make no commit."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(ticket_dir),
            commit_message=f"Upload ticket from {Path(ticket_dir).name}",
            ignore_patterns=["run_signature.json", ".*"],
        )
    except (HfHubHTTPError, RepositoryNotFoundError) as err:
        raise _explain(err, repo_id, "push the ticket to") from err
    return str(getattr(info, "commit_url", info))


def mask_path_in_repo(language: str, sparsity: float, method: str, scope: str, layerwise: bool) -> str:
    """``masks/<language>/sparsity-0.80.safetensors``; non-default method/scope are spelled out."""
    variant = "" if (method, scope, layerwise) == ("magnitude", "encoder_linear", False) else f"_{method}{'-layerwise' if layerwise else ''}_{scope}"
    return f"masks/{language}/sparsity-{sparsity:.2f}{variant}.safetensors"


def _read_index(api: HfApi, repo_id: str) -> list[dict]:
    try:
        path = hf_hub_download(repo_id, INDEX_FILE, repo_type="dataset", token=api.token, endpoint=api.endpoint)
    except EntryNotFoundError:
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

    Idempotent: a row already present with the same sha256 (and its file present) makes no
    commit. Returns whether a commit was made."""
    api = HfApi(token=token)
    row = {k: str(v) for k, v in row.items()}
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        rows = [r for r in _read_index(api, repo_id)]
        existing = next((r for r in rows if r["file"] == row["file"]), None)
        if existing == {k: row.get(k, "") for k in INDEX_COLUMNS} and api.file_exists(repo_id, row["file"], repo_type="dataset"):
            logger.info("%s already holds %s with sha256 %s: nothing to push", repo_id, row["file"], row["sha256"][:12])
            return False
        rows = [r for r in rows if r["file"] != row["file"]] + [row]
        operations = [
            CommitOperationAdd(path_in_repo=row["file"], path_or_fileobj=str(mask_file)),
            CommitOperationAdd(path_in_repo=INDEX_FILE, path_or_fileobj=_index_csv(rows)),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_masks_dataset_card(repo_id).encode()),
        ]
        api.create_commit(repo_id, operations, repo_type="dataset", commit_message=f"Add {row['file']}")
    except (HfHubHTTPError, RepositoryNotFoundError) as err:
        raise _explain(err, repo_id, "push the mask to") from err
    return True
