"""The Hugging Face Hub without a network: a cache laid out on disk and a recording HfApi.

`lay_out_cache` writes a model repository in the standard cache layout, so that huggingface_hub's
own cache code resolves it offline; `FakeHub` stands in for `huggingface_hub.HfApi` and turns
each upload into a new commit of that cache, so that what was pushed can be pulled back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional

__all__ = ["FakeHub", "lay_out_cache"]


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


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls; each upload becomes a commit in `cache`.

    Install it with ``monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)``; every upload's
    folder is also copied to ``uploads/<n>`` (`last_upload`).
    """

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

    def upload_folder(self, **kwargs: Any) -> Any:
        import huggingface_hub

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
        """The keyword arguments of the one call of `name` (AssertionError unless exactly one)."""
        found = [kw for n, kw in self.calls if n == name]
        assert len(found) == 1, (name, self.calls)
        return found[0]

    def last_upload(self) -> Path:
        return sorted(self.uploads.iterdir(), key=lambda p: int(p.name))[-1]
