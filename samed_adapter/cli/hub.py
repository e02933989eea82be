"""`samed-adapter push` and `pull`: an adapter to and from the Hugging Face Hub."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..io.files import atomic_path
from ..io.printable import printable
from .common import SubParsers, adapter_output, example_parser, fail


def cmd_push(args: argparse.Namespace) -> int:
    """`push`: upload an adapter file and its model card to the Hub."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import push_to_hub

    evaluation = None
    if args.evaluation is not None:
        path = Path(args.evaluation)
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation file at {path}; give a Markdown file (e.g. from `evaluate`)")
        evaluation = path.read_text(encoding="utf-8")
    try:
        info = push_to_hub(
            args.adapter, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            commit_message=args.commit_message, create_pr=args.create_pr, evaluation=evaluation,
            base_model=args.base_model,
        )
    except HfHubHTTPError as err:
        fail("push", f"{err}\ncheck that you are logged in (`hf auth login`, or --token) with write access to "
                      f"{args.repo_id}")
        return 2
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {printable(args.adapter)} to {args.repo_id}: {url}")
    return 0


def add_push_parser(sub: SubParsers) -> None:
    """Declare `push` and its arguments."""
    p = example_parser(
        sub, "push", "upload an adapter and its model card to the Hugging Face Hub",
        "examples:\n  samed-adapter push synapse.safetensors my-org/samed-synapse --private\n"
        "  samed-adapter push synapse.safetensors my-org/samed-synapse --revision v2 --evaluation results.md",
    )
    p.add_argument("adapter", help="the adapter .safetensors file")
    p.add_argument("repo_id", help="the Hub model repository, org/name (created if missing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", help="Hub token with write access (default: saved login or HF_TOKEN)")
    p.add_argument("--evaluation", metavar="FILE.md", help="Markdown with evaluation results for the model card")
    p.add_argument("--base-model", help="stock SAM: Hub id or checkpoint name (default: from the backbone)")
    p.set_defaults(func=cmd_push)


def cmd_pull(args: argparse.Namespace) -> int:
    """`pull`: fetch a Hub adapter into the cache; print its path or copy it to -o."""
    from ..adapter_file.adapter import Adapter
    from ..hub import hf_hub_adapter_path, parse_repo_id

    repo, _ = parse_repo_id(args.repo_id, args.revision)
    target = None
    if args.output is not None:  # checked before the download
        target = Path(args.output)
        # A trailing slash or an existing folder means a folder (made if missing), else the file to write.
        if args.output.endswith(("/", os.sep)) or target.is_dir():
            if target.exists() and not target.is_dir():
                raise FileExistsError(f"-o {printable(args.output)} names a folder, but {printable(target)} is a file")
            target = target / f"{repo.split('/')[1]}.safetensors"
            if target.parent.is_dir():
                adapter_output(target, overwrite=args.overwrite)
        else:
            adapter_output(target, overwrite=args.overwrite)
    cached = hf_hub_adapter_path(args.repo_id, revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    adapter = Adapter.load(cached)  # check it is a valid adapter before handing it out
    if target is None:
        print(printable(cached))
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    adapter_output(target, overwrite=args.overwrite)
    with atomic_path(target) as tmp:
        shutil.copyfile(cached, tmp)
    print(f"wrote {printable(target)} ({adapter.config.num_classes} classes, {adapter.nbytes / 2**20:.2f} MiB)")
    return 0


def add_pull_parser(sub: SubParsers) -> None:
    """Declare `pull` and its arguments."""
    p = example_parser(
        sub, "pull", "download an adapter from the Hub into the cache (for offline use)",
        "examples:\n  samed-adapter pull my-org/samed-synapse          # prints the cached file's path\n"
        "  samed-adapter pull my-org/samed-synapse@v2 -o synapse.safetensors",
    )
    p.add_argument("repo_id", help="the Hub id, org/name[@revision]")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--token", help="Hub token for private or gated repositories")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="also copy the adapter here: a folder if PATH ends with / or is one (made if missing; the "
                        "file is NAME.safetensors), else the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace -o's file even if it is not an adapter file")
    p.set_defaults(func=cmd_pull)
