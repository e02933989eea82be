"""Hub ids through huggingface_hub's real cache code, and push_to_hub with a recording HfApi.

No test touches the network: HF_HUB_OFFLINE is on for every test (env and huggingface_hub's
constant), the cache is laid out in tmp_path in the standard layout, and HfApi is replaced by a
recorder that writes each upload into that cache as a new commit.
"""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants, hf_hub_download

import samed_adapter as sa
from samed_adapter import hub
from samed_adapter.hub import AdapterNotFoundError
from samed_adapter.testing import random_adapter, same_tensors
from samed_adapter.testing.hub import lay_out_cache
from samed_adapter.testing.tiny import stock_sam

pytestmark = pytest.mark.usefixtures("offline_cache")  # conftest: HF_HUB_OFFLINE, the cache in tmp_path

SIZE = 64
CONFIG = sa.AdapterConfig(num_classes=3, image_size=SIZE)


def adapter_bytes(adapter: sa.Adapter, tmp_path: Path, name: str = "a.safetensors") -> bytes:
    return adapter.save(tmp_path / name).read_bytes()


# --------------------------------------------------------------------------- pull


def test_hf_hub_download_resolves_the_laid_out_cache(tmp_path, offline_cache):
    data = adapter_bytes(random_adapter(stock_sam(), CONFIG, seed=1), tmp_path)
    commit = lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": data})
    path = hf_hub_download("org/name", "adapter.safetensors", local_files_only=True, cache_dir=offline_cache)
    assert Path(path) == offline_cache / "models--org--name" / "snapshots" / commit / "adapter.safetensors"
    assert Path(path).read_bytes() == data
    assert hub.hf_hub_adapter_path("org/name", cache_dir=offline_cache) == Path(path)


def test_load_and_patch_by_hub_id_offline(tmp_path, offline_cache):
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(adapter, tmp_path)})
    assert same_tensors(sa.Adapter.load("org/name"), adapter)
    assert same_tensors(sa.Adapter.load("org/name", cache_dir=offline_cache, local_files_only=True), adapter)

    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    by_id = sa.patch(sa.build_sam("tiny", seed=0), "org/name")(x)["low_res_logits"]
    direct = sa.patch(sa.build_sam("tiny", seed=0), adapter)(x)["low_res_logits"]
    torch.testing.assert_close(by_id, direct, rtol=0, atol=0)


def test_revision_selects_another_snapshot(tmp_path, offline_cache):
    first, second = random_adapter(stock_sam(), CONFIG, seed=1), random_adapter(stock_sam(), CONFIG, seed=2)
    old = lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(first, tmp_path, "1")},
                        ref="v1")
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(second, tmp_path, "2")})
    assert same_tensors(sa.Adapter.load("org/name"), second)
    assert same_tensors(sa.Adapter.load("org/name@v1"), first)
    assert same_tensors(sa.Adapter.load("org/name", revision="v1"), first)
    assert same_tensors(sa.Adapter.load(f"org/name@{old}"), first)  # a commit hash
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    pinned = sa.patch(sa.build_sam("tiny", seed=0), "org/name@v1")(x)["low_res_logits"]
    torch.testing.assert_close(pinned, sa.patch(sa.build_sam("tiny", seed=0), first)(x)["low_res_logits"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="give one"):
        sa.Adapter.load("org/name@v1", revision="main")


def test_missing_repo_offline_says_how_to_get_it(tmp_path, offline_cache):
    with pytest.raises(AdapterNotFoundError) as info:
        sa.Adapter.load("org/missing")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "samed-adapter pull org/missing" in message and "HF_HUB_OFFLINE" in message
    assert "local path" in message
    with pytest.raises(AdapterNotFoundError, match="org/missing"):
        sa.patch(sa.build_sam("tiny", seed=0), "org/missing")
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(adapter, tmp_path)})
    with pytest.raises(AdapterNotFoundError, match="org/name@v9"):
        sa.Adapter.load("org/name@v9")


def test_offline_env_is_read_when_called(monkeypatch, tmp_path, offline_cache):
    """HF_HUB_OFFLINE set after huggingface_hub was imported still means: cache only."""
    seen: dict[str, Any] = {}
    real = huggingface_hub.hf_hub_download

    def spy(*args: Any, **kwargs: Any) -> str:
        seen.update(kwargs)
        return real(*args, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(adapter, tmp_path)})
    hub.hf_hub_adapter_path("org/name")
    assert seen["local_files_only"] is True and seen["library_name"] == "samed-adapter"


def _http_error(cls: type, status: int) -> Exception:
    response = types.SimpleNamespace(status_code=status, headers={}, request=None)
    return cls("from the Hub", response=response)


@pytest.mark.parametrize(
    "error, message",
    [
        ("RepositoryNotFoundError", "no Hub repository org/name"),
        ("GatedRepoError", "gated repository"),
        ("RevisionNotFoundError", "has no revision"),
        ("RemoteEntryNotFoundError", "has no adapter.safetensors"),
    ],
)
def test_hub_errors_say_what_to_do(monkeypatch, error, message):
    cls = getattr(huggingface_hub.errors, error)

    def raising(*args: Any, **kwargs: Any) -> str:
        raise _http_error(cls, 404)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising)
    with pytest.raises(AdapterNotFoundError, match=message):
        sa.Adapter.load("org/name")


def test_a_local_path_wins_over_the_hub(monkeypatch, tmp_path, offline_cache):
    hub_adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    local_adapter = random_adapter(stock_sam(), CONFIG, seed=2)
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(hub_adapter, tmp_path)})
    monkeypatch.chdir(tmp_path)
    local_adapter.save(tmp_path / "org" / "name")
    assert same_tensors(sa.Adapter.load("org/name"), local_adapter)
    with pytest.raises(ValueError, match="local file"):
        sa.Adapter.load("org/name", revision="v1")
    # a folder holding adapter.safetensors (e.g. a downloaded repository) is local too
    local_adapter.save(tmp_path / "team" / "model" / "adapter.safetensors")
    lay_out_cache(offline_cache, "team/model", {"adapter.safetensors": adapter_bytes(hub_adapter, tmp_path)})
    assert same_tensors(sa.Adapter.load("team/model"), local_adapter)
    # a missing file path is not sent to the Hub
    with pytest.raises(FileNotFoundError, match="no adapter file") as info:
        sa.Adapter.load("adapters/missing.safetensors")
    assert not isinstance(info.value, AdapterNotFoundError)
    assert same_tensors(sa.Adapter.load(Path("org/name")), local_adapter)


@pytest.mark.parametrize(
    "text, expected",
    [("org/name", True), ("org/name@v1.0", True), ("o-1/n_a.me@refs/pr/1", True), ("name", False),
     ("org/name.safetensors", False), ("./org/name", False), ("/abs/path", False), ("a/b/c", False),
     ("~/x", False), ("C:/x", False), (Path("org/name"), False)],
)
def test_what_looks_like_a_hub_id(text, expected):
    assert hub.looks_like_repo_id(text) is expected


def test_invalid_hub_ids_are_refused():
    assert hub.parse_repo_id("org/name@v1") == ("org/name", "v1")
    assert hub.parse_repo_id("org/name", "dev") == ("org/name", "dev")
    with pytest.raises(ValueError, match="not a Hub id"):
        hub.parse_repo_id("org/na--me")


# --------------------------------------------------------------------------- push


def _summary():
    from samed_adapter.evaluation.metrics import ClassScore
    from samed_adapter.evaluation.summary import summarize

    scores = [ClassScore(0.9, 2.0, False, False), ClassScore(0.5, 10.0, False, False), ClassScore(None, None, True, True)]
    return summarize({"case1": scores, "case2": scores}, ["liver", "tumour", "vessel"])


def test_push_records_arguments_and_writes_a_model_card(fake_hub, tmp_path):
    config = sa.AdapterConfig(num_classes=3, image_size=SIZE, class_names=["liver", "tumour", "vessel"])
    adapter = random_adapter(stock_sam(), config, seed=1)
    info = sa.push_to_hub(
        adapter, "org/name", token="hf_secret", private=True, revision="dev", commit_message="first",
        create_pr=False, evaluation=_summary(), base_model="facebook/sam-vit-base",
    )
    assert info.commit_url.startswith("https://huggingface.co/org/name/commit/")
    assert fake_hub.call("create_repo") == {"repo_id": "org/name", "token": "hf_secret", "private": True,
                                            "repo_type": "model", "exist_ok": True}
    assert fake_hub.call("create_branch")["branch"] == "dev"
    upload = fake_hub.call("upload_folder")
    assert {k: upload[k] for k in ("repo_id", "revision", "commit_message", "create_pr", "token")} == {
        "repo_id": "org/name", "revision": "dev", "commit_message": "first", "create_pr": False, "token": "hf_secret"}

    folder = fake_hub.last_upload()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors"]
    assert same_tensors(sa.Adapter.load(folder / "adapter.safetensors"), adapter)
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "samed-adapter"
    assert meta["tags"] == ["medical-imaging", "image-segmentation", "lora", "samed", "segment-anything"]
    assert meta["base_model"] == "facebook/sam-vit-base"
    assert meta["class_names"] == ["liver", "tumour", "vessel"] and meta["num_classes"] == 3
    assert meta["base_fingerprint"] == adapter.base_fingerprint
    assert meta["adapter_config"] == json.loads(adapter.config.to_json())
    assert meta["evaluation"]["mean_dice"] == pytest.approx(0.7)
    assert [c["name"] for c in meta["evaluation"]["classes"]] == ["liver", "tumour", "vessel"]
    assert 'samed_adapter.patch(sam, "org/name")' in card.text
    assert "| liver | 90.00 | 2.00 |" in card.text and "## Configuration" in card.text
    # what was pushed to the branch is what a pull of that revision gives
    assert same_tensors(sa.Adapter.load("org/name@dev"), adapter)


def test_push_defaults_from_a_file_and_from_a_model(fake_hub, tmp_path):
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    path = adapter.save(tmp_path / "mine.safetensors", dtype=torch.float16)
    sa.push_to_hub(path, "org/name")
    assert fake_hub.call("create_repo")["private"] is None
    assert not [n for n, _ in fake_hub.calls if n == "create_branch"]
    upload = fake_hub.call("upload_folder")
    assert upload["revision"] is None and upload["create_pr"] is False and upload["token"] is None
    assert upload["commit_message"] == "Upload SAMed adapter (3 classes, tiny)"
    assert (fake_hub.last_upload() / "adapter.safetensors").read_bytes() == path.read_bytes()  # byte for byte
    meta = ModelCard.load(fake_hub.last_upload() / "README.md").data.to_dict()
    assert "base_model" not in meta and "evaluation" not in meta  # no Hub id for the test backbone

    model = sa.patch(sa.build_sam("tiny", seed=0), adapter)
    info = sa.push_to_hub(model, "org/other", create_pr=True, evaluation="| a | b |\n|---|---|\n| 1 | 2 |",
                          base_model="sam_tiny_seed0.pth")
    assert info.pr_url.endswith("/discussions/1")
    card = ModelCard.load(fake_hub.last_upload() / "README.md")
    assert "## Evaluation" in card.text and "| 1 | 2 |" in card.text
    assert card.data.to_dict()["base_checkpoint"] == "sam_tiny_seed0.pth"
    assert same_tensors(sa.Adapter.load(fake_hub.last_upload() / "adapter.safetensors"), adapter)


def test_push_refuses_what_it_cannot_push(fake_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        sa.push_to_hub(tmp_path / "missing.safetensors", "org/name")
    with pytest.raises(TypeError, match="Adapter, a SAMed model or a file path"):
        sa.push_to_hub(42, "org/name")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a Hub id"):
        sa.push_to_hub(random_adapter(stock_sam(), CONFIG, seed=1), "not a repo")
    assert fake_hub.calls == []


def test_model_card_for_vit_b_names_the_stock_weights():
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    adapter.config.backbone = "vit_b"  # only the card's text depends on it here
    card = hub.model_card(adapter, "org/name")
    meta = card.data.to_dict()
    assert meta["base_model"] == "facebook/sam-vit-base" and meta["base_checkpoint"] == "sam_vit_b_01ec64.pth"
    assert 'sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")' in card.text


def test_model_card_of_a_click_adapter_shows_the_session_and_a_plain_one_does_not():
    from samed_adapter.testing.tiny import CONFIGS

    clicks = hub.model_card(random_adapter(stock_sam(), CONFIGS["clicks"], seed=1), "org/name").text
    assert 'session.click("class_1", (i, j, k), positive=True)' in clicks and "clicks: yes" in clicks
    plain = hub.model_card(random_adapter(stock_sam(), CONFIG, seed=1), "org/name").text
    assert "interactive" not in plain and "clicks: no" in plain


# --------------------------------------------------------------------------- revisions, no network, the cache


@pytest.mark.parametrize("revision", ["../../x", "a/../../x", "..", ".hidden", "v1/.x", "x.lock", "a b", "x~1", "x^",
                                      "a:b", "a?", "a*", "a[", "a\\b", "/abs", "x/", "a//b", "x.", "@", "a@{1}",
                                      "x\x1b[2J", "x\x7f", ""])
def test_a_revision_that_is_no_ref_name_is_refused_before_any_lookup(monkeypatch, tmp_path, offline_cache, revision):
    """huggingface_hub reads the cache file refs/<revision>: `../../x` read a file outside the cache."""
    adapter = random_adapter(stock_sam(), CONFIG, seed=1)
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(adapter, tmp_path)})
    (offline_cache / "x").write_text("a secret outside the repository's folder")
    calls: list[Any] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or "")
    expected = "not a branch, tag or commit name" if revision else "non-empty"
    with pytest.raises(ValueError, match=expected) as info:
        sa.Adapter.load("org/name", revision=revision)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
    if revision and " " not in revision:  # the same in the id's @revision form
        with pytest.raises(ValueError, match=expected):
            hub.hf_hub_adapter_path(f"org/name@{revision}")
    assert calls == []


@pytest.mark.parametrize("revision", ["main", "v1.0", "dev/feature-1", "refs/pr/1", "release_2024.03", "0" * 40])
def test_branch_tag_and_commit_names_are_accepted(revision):
    assert hub.check_revision(revision) == revision
    assert hub.parse_repo_id(f"org/name@{revision}") == ("org/name", revision)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> str:
    """Online mode with HF_ENDPOINT at a closed local port (nothing listens on the discard port)."""
    endpoint = "http://127.0.0.1:9"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return endpoint


def test_without_network_loading_fails_fast_and_says_what_to_do(no_network, offline_cache):
    """It used to retry for 26 s and then suggest the command just run (`samed-adapter pull`)."""
    start = time.perf_counter()
    with pytest.raises(AdapterNotFoundError) as info:
        hub.hf_hub_adapter_path("org/name")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    for needed in (str(offline_cache), "HF_HUB_OFFLINE", "HF_ENDPOINT", no_network, "local path", "cannot be reached"):
        assert needed in message, needed
    assert "samed-adapter pull" not in message and "\n" not in message


def test_without_network_a_cached_adapter_is_used_at_once(no_network, tmp_path, offline_cache):
    data = adapter_bytes(random_adapter(stock_sam(), CONFIG, seed=1), tmp_path)
    commit = lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": data})
    start = time.perf_counter()
    path = hub.hf_hub_adapter_path("org/name")
    assert time.perf_counter() - start < 5
    assert path == offline_cache / "models--org--name" / "snapshots" / commit / "adapter.safetensors"


def test_push_without_network_is_one_line_and_pushes_nothing(no_network, tmp_path):
    path = random_adapter(stock_sam(), CONFIG, seed=1).save(tmp_path / "a.safetensors")
    start = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError) as info:
        hub.push_to_hub(path, "org/name")
    assert time.perf_counter() - start < 20  # no retries
    message = str(info.value)
    assert message.startswith("nothing was pushed to org/name") and no_network in message and "HF_ENDPOINT" in message
    assert "\n" not in message and isinstance(info.value, OSError)


@pytest.mark.parametrize("broken", ["cache is a file", "repo folder is a file"])
def test_an_unreadable_cache_is_not_called_a_missing_adapter(monkeypatch, tmp_path, offline_cache, broken):
    if broken == "cache is a file":
        cache = tmp_path / "cache-file"
        cache.write_text("not a folder")
    else:
        cache = offline_cache
        (cache / "models--org--name").write_text("not a folder")
    with pytest.raises(hub.HubCacheError) as info:
        hub.hf_hub_adapter_path("org/name", cache_dir=cache)
    message = str(info.value)
    assert "cannot be read" in message and "is not a folder" in message and "not in the" not in message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_a_cache_folder_without_permission_is_not_called_a_missing_adapter(tmp_path, offline_cache):
    folder = offline_cache / "models--org--name"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(hub.HubCacheError, match="cannot be read"):
            hub.hf_hub_adapter_path("org/name")
    finally:
        folder.chmod(0o755)
