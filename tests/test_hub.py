"""Hub ids through huggingface_hub's real cache code, and push_to_hub with a recording HfApi.

No test touches the network: HF_HUB_OFFLINE is on for every test (env and huggingface_hub's
constant), the cache is laid out in tmp_path in the standard layout, and HfApi is replaced by a
recorder that writes each upload into that cache as a new commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types
from pathlib import Path
from typing import Any, Optional

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants, hf_hub_download

import samed_adapter as sa
from samed_adapter.testing import random_adapter
from samed_adapter import hub
from samed_adapter.hub import AdapterNotFoundError

SIZE = 64


# --------------------------------------------------------------------------- helpers (test_cli uses them too)


def make_adapter(seed: int = 1, sam_seed: int = 0, num_classes: int = 3, **config: Any) -> sa.Adapter:
    """A trained-looking adapter (every trainable tensor moved) made on build_sam("tiny", seed=sam_seed)."""
    cfg = sa.AdapterConfig(num_classes=num_classes, image_size=SIZE, **config)
    return random_adapter(sa.build_sam("tiny", seed=sam_seed), cfg, seed=seed)


def lay_out_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], *, ref: Optional[str] = "main") -> str:
    """Write one commit of a Hub model repo in the standard Hugging Face cache layout.

    models--org--name/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256> and
    refs/<ref> holding the commit hash. Returns the commit hash.
    """
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(name.encode() + files[name])
    commit = digest.hexdigest()
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (e.g. Windows without developer mode): the Hub copies too
            link.write_bytes(data)
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return commit


def adapter_bytes(adapter: sa.Adapter, tmp_path: Path, name: str = "a.safetensors") -> bytes:
    return adapter.save(tmp_path / name).read_bytes()


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls; each upload becomes a commit in `cache`."""

    def __init__(self, cache: Path, uploads: Path) -> None:
        self.cache, self.uploads = cache, uploads
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def api(self, *args: Any, **kwargs: Any) -> "FakeHub":  # HfApi(...) -> the recorder
        self.calls.append(("HfApi", dict(kwargs)))
        return self

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> huggingface_hub.CommitInfo:
        self.calls.append(("upload_folder", dict(kwargs)))
        folder = Path(kwargs["folder_path"])
        dest = self.uploads / str(len(list(self.uploads.iterdir())) + 1)
        shutil.copytree(folder, dest)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        ref = None if kwargs.get("create_pr") else (kwargs.get("revision") or "main")
        commit = lay_out_cache(self.cache, kwargs["repo_id"], files, ref=ref)
        url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{commit}"
        return huggingface_hub.CommitInfo(
            commit_url=url, commit_message=kwargs.get("commit_message") or "", commit_description="", oid=commit,
            pr_url=f"https://huggingface.co/{kwargs['repo_id']}/discussions/1" if kwargs.get("create_pr") else None,
        )

    def call(self, name: str) -> dict[str, Any]:
        found = [kw for n, kw in self.calls if n == name]
        assert len(found) == 1, (name, self.calls)
        return found[0]

    def last_upload(self) -> Path:
        return sorted(self.uploads.iterdir(), key=lambda p: int(p.name))[-1]


@pytest.fixture(autouse=True)
def offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE on and the default Hugging Face cache in tmp_path, for every test."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, offline_cache: Path, tmp_path: Path) -> FakeHub:
    fake = FakeHub(offline_cache, tmp_path / "uploads")
    fake.uploads.mkdir()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    return fake


def same_tensors(a: sa.Adapter, b: sa.Adapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# --------------------------------------------------------------------------- pull


def test_hf_hub_download_resolves_the_laid_out_cache(tmp_path, offline_cache):
    data = adapter_bytes(make_adapter(), tmp_path)
    commit = lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": data})
    path = hf_hub_download("org/name", "adapter.safetensors", local_files_only=True, cache_dir=offline_cache)
    assert Path(path) == offline_cache / "models--org--name" / "snapshots" / commit / "adapter.safetensors"
    assert Path(path).read_bytes() == data
    assert hub.hf_hub_adapter_path("org/name", cache_dir=offline_cache) == Path(path)


def test_load_and_patch_by_hub_id_offline(tmp_path, offline_cache):
    adapter = make_adapter()
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(adapter, tmp_path)})
    assert same_tensors(sa.Adapter.load("org/name"), adapter)
    assert same_tensors(sa.Adapter.load("org/name", cache_dir=offline_cache, local_files_only=True), adapter)

    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    by_id = sa.patch(sa.build_sam("tiny", seed=0), "org/name")(x)["low_res_logits"]
    direct = sa.patch(sa.build_sam("tiny", seed=0), adapter)(x)["low_res_logits"]
    torch.testing.assert_close(by_id, direct, rtol=0, atol=0)


def test_revision_selects_another_snapshot(tmp_path, offline_cache):
    first, second = make_adapter(seed=1), make_adapter(seed=2)
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
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(make_adapter(), tmp_path)})
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
    lay_out_cache(offline_cache, "org/name", {"adapter.safetensors": adapter_bytes(make_adapter(), tmp_path)})
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
    hub_adapter, local_adapter = make_adapter(seed=1), make_adapter(seed=2)
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
    from samed_adapter.metrics import ClassScore, summarize

    scores = [ClassScore(0.9, 2.0, False, False), ClassScore(0.5, 10.0, False, False), ClassScore(None, None, True, True)]
    return summarize({"case1": scores, "case2": scores}, ["liver", "tumour", "vessel"])


def test_push_records_arguments_and_writes_a_model_card(fake_hub, tmp_path):
    adapter = make_adapter(class_names=["liver", "tumour", "vessel"])
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
    adapter = make_adapter()
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
        sa.push_to_hub(make_adapter(), "not a repo")
    assert fake_hub.calls == []


def test_model_card_for_vit_b_names_the_stock_weights():
    adapter = make_adapter()
    adapter.config.backbone = "vit_b"  # only the card's text depends on it here
    card = hub.model_card(adapter, "org/name")
    meta = card.data.to_dict()
    assert meta["base_model"] == "facebook/sam-vit-base" and meta["base_checkpoint"] == "sam_vit_b_01ec64.pth"
    assert 'sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")' in card.text
