"""A hand-built Hugging Face Hub cache: lets the real ``hf_hub_download``/``from_pretrained`` code
read repos offline (``HF_HUB_OFFLINE=1``), as NOTES.md describes."""

import hashlib
from pathlib import Path


def add_offline_repo(cache_dir: Path, repo_id: str, repo_type: str, files: dict[str, bytes]) -> str:
    """Lay ``files`` out as snapshot ``main`` of ``repo_id``; returns the fake commit sha."""
    sha = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    for name, data in files.items():
        path = repo_dir / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sha
