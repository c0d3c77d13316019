"""The Hub failing mid-push: the local test server answers 500, drops the connection, loses the
answer of a commit it applied, or never answers. Each push ends in one HubError line, and running
it again completes it with no duplicate index row and no empty commit."""

import csv
import hashlib
import io
import os
from types import SimpleNamespace

import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub import file_download
from huggingface_hub import set_client_factory
from huggingface_hub.utils import _http

from tests.conftest import run_script
from tests.faults import last_line
from tests.hub_server import FAULT_MODES, TOKEN, HubServer
from utils.errors import UsageError
from utils.hub import INDEX_COLUMNS, INDEX_FILE, push_mask, push_ticket
from utils.hub_client import HUB_TIMEOUT_ENV, HubError, bound_hub_waits, hub_timeout

MASKS = "me/masks"
TIMEOUT_S = 1


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub this process pushes to, every Hub wait bounded to TIMEOUT_S, the library's retry
    back-off (1 + 2 + 4 + 8 + 8 s) not waited: its retries still happen."""
    with HubServer() as server:
        monkeypatch.setattr(hub_constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # the library's retries without their waits
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(file_download, "_ETAG_RETRY_TIMEOUT", TIMEOUT_S)  # its second round of look-ups, bounded too
        monkeypatch.setenv(HUB_TIMEOUT_ENV, str(TIMEOUT_S))
        server.state.hang_s = 10 * TIMEOUT_S
        bound_hub_waits()
        try:
            yield server
        finally:
            set_client_factory(_http.default_client_factory)


def mask_file(tmp_path, language: str) -> tuple:
    """A stand-in mask file (push_mask treats it as bytes) and its index row."""
    path = tmp_path / f"{language}.safetensors"
    path.write_bytes(f"mask of {language} ".encode() * 50)
    row = {"file": f"masks/{language}/sparsity-0.80.safetensors", "language": language, "sparsity": "0.80", "method": "magnitude",
           "scope": "encoder_linear", "layerwise": False, "source_model": "facebook/wav2vec2-xls-r-300m", "source_revision": "",
           "ticket_repo": "", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kept": 20, "total": 100}
    return path, row


def push(tmp_path, language: str) -> bool:
    path, row = mask_file(tmp_path, language)
    return push_mask(path, MASKS, row, token=TOKEN)


def index_rows(hub) -> list[dict]:
    """The rows of the masks repo's index.csv, as the Hub holds it."""
    return list(csv.DictReader(io.StringIO(hub.repo(MASKS, "dataset").files[INDEX_FILE].decode())))


def assert_masks_repo_holds(hub, tmp_path, languages):
    """Each language's file and exactly one index row for it; every commit changed something."""
    repo = hub.repo(MASKS, "dataset")
    rows = index_rows(hub)
    assert sorted(r["language"] for r in rows) == sorted(languages)
    assert list(rows[0]) == INDEX_COLUMNS
    for language in languages:
        path, row = mask_file(tmp_path, language)
        assert repo.files[row["file"]] == path.read_bytes()
        assert next(r for r in rows if r["language"] == language)["sha256"] == row["sha256"]
    assert len(repo.commits) == len(languages) and all(commit["paths"] for commit in repo.commits)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and MASKS in message
    return message


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_a_mask_push_failing_mid_way_is_completed_by_re_running(hub, tmp_path, mode):
    assert push(tmp_path, "en")
    hub.fail(f"/api/datasets/{MASKS}/commit/", mode)
    with pytest.raises(HubError) as err:
        push(tmp_path, "de")
    message = one_line(err)
    assert "re-run" in message
    if mode == "hang":
        assert f"did not answer within {TIMEOUT_S} s" in message
    landed = mode == "lost-answer"  # the server applied it; the client only lost the answer
    assert len(hub.repo(MASKS, "dataset").commits) == 1 + landed
    assert sorted(r["language"] for r in index_rows(hub)) == (["de", "en"] if landed else ["en"])
    # The same push again completes it (or finds it complete), and again after that is a no-op.
    assert push(tmp_path, "de") is not landed
    assert push(tmp_path, "de") is False
    assert_masks_repo_holds(hub, tmp_path, ["en", "de"])


@pytest.mark.parametrize("mode", ["hang", "drop", "500"])
def test_a_failed_index_read_never_drops_rows(hub, tmp_path, mode):
    """huggingface_hub answers a failed look-up with LocalEntryNotFoundError: taken for "no index
    yet", the push would commit an index holding only its own row."""
    assert push(tmp_path, "en")
    hub.fail(f"/datasets/{MASKS}/resolve/", mode, times=12, method="HEAD")  # both rounds of the library's 1 + 5 tries
    with pytest.raises(HubError) as err:
        push(tmp_path, "de")
    one_line(err)
    assert [r["language"] for r in index_rows(hub)] == ["en"] and len(hub.repo(MASKS, "dataset").commits) == 1
    hub.state.faults.clear()
    assert push(tmp_path, "de")
    assert_masks_repo_holds(hub, tmp_path, ["en", "de"])


def test_a_push_landing_in_between_is_kept_not_overwritten(hub, tmp_path):
    """Another mask's push lands between our read of the index and our commit (two grid slots
    pushing at once): the Hub refuses our commit (its parent is stale), we read the index again."""
    assert push(tmp_path, "en")
    hub.state.before_commit.append(lambda: push(tmp_path, "fr"))
    assert push(tmp_path, "de")
    assert_masks_repo_holds(hub, tmp_path, ["en", "fr", "de"])


def test_the_librarys_own_retries_are_kept(hub, tmp_path):
    """huggingface_hub retries its pre-upload call on a 5xx: one 500 there costs a second, not the push."""
    hub.fail(f"/api/datasets/{MASKS}/preupload/", "500")
    assert push(tmp_path, "en")
    assert hub.state.faults[0].times == 0
    assert_masks_repo_holds(hub, tmp_path, ["en"])


def ticket_dir(tmp_path):
    out = tmp_path / "ticket"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "wav2vec2"}\n')
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    (out / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# a ticket\n")
    (out / "run_signature.json").write_text("{}\n")
    return out


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_a_ticket_push_survives_one_fault_and_is_completed_by_re_running_after_many(hub, tmp_path, mode):
    """upload_folder retries its commit; with the head as parent, a retry of a commit that landed
    is refused rather than made twice, and the next look finds nothing to commit."""
    out = ticket_dir(tmp_path)
    hub.fail("/api/models/me/ticket/commit/", mode)  # once: the library's retry (and our look again) absorb it
    push_ticket(out, "me/ticket", token=TOKEN)
    assert_ticket_repo_holds(hub, "me/ticket", out)
    hub.fail("/api/models/me/other/commit/", mode, times=10)  # more than the library's 5 retries
    with pytest.raises(HubError) as err:
        push_ticket(out, "me/other", token=TOKEN)
    assert "me/other" in str(err.value) and "\n" not in str(err.value) and "re-run" in str(err.value)
    assert len(hub.repo("me/other").commits) == (mode == "lost-answer")
    hub.state.faults.clear()
    push_ticket(out, "me/other", token=TOKEN)
    push_ticket(out, "me/other", token=TOKEN)
    assert_ticket_repo_holds(hub, "me/other", out)


def assert_ticket_repo_holds(hub, repo_id, out):
    """One commit holding the ticket's files (never its run signature)."""
    repo = hub.repo(repo_id)
    assert len(repo.commits) == 1 and repo.commits[0]["paths"] == ["README.md", "config.json", "model.safetensors"]
    assert all(repo.files[name] == (out / name).read_bytes() for name in repo.commits[0]["paths"])


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf", "nan"])
def test_a_bad_hub_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv(HUB_TIMEOUT_ENV, value)
    with pytest.raises(UsageError, match=f"{HUB_TIMEOUT_ENV}={value!r} is not a number of seconds"):
        hub_timeout()


def test_run_prune_whose_mask_push_lost_its_answer_completes_on_re_run(source, tmp_path):
    """The script end to end: the ticket lands, the mask commit lands but its answer is lost (one
    line, exit 2); the same command again commits nothing new anywhere."""
    with HubServer() as server:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), **{HUB_TIMEOUT_ENV: "5"})
        env.pop("HF_HUB_OFFLINE", None)
        command = ["--model_name_or_path", str(source), "--language", "en", "--sparsity", "0.8", "--output_dir", str(tmp_path / "ticket"),
                   "--push_to_hub", "--hub_model_id", "me/tiny-en-ticket", "--hub_mask_repo_id", MASKS]
        server.fail(f"/api/datasets/{MASKS}/commit/", "lost-answer")
        result = run_script(command, env, "run_prune.py")
        assert result.returncode == 2, result.stderr[-3000:]
        last = last_line(result)
        assert last.startswith(f"error: cannot push the mask to {MASKS}: the connection to the Hub failed") and "re-run" in last, last
        result = run_script(command, env, "run_prune.py")
        assert result.returncode == 0, result.stderr[-3000:]
        ticket, masks = server.repo("me/tiny-en-ticket"), server.repo(MASKS, "dataset")
        assert len(ticket.commits) == 1 and len(masks.commits) == 1
        rows = index_rows(server)
        assert [r["language"] for r in rows] == ["en"]
        assert masks.files[rows[0]["file"]] == (tmp_path / "ticket" / "mask.safetensors").read_bytes()
