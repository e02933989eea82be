"""The Hugging Face Hub: push adapters with a model card (Hub ids are resolved in `hub_cache`).

A Hub adapter repository holds one `adapter.safetensors` (the file `Adapter.save` writes) and a
README model card. `Adapter.load("org/name")` and `patch(sam, "org/name")` download it once into
the standard Hugging Face cache (`HF_HUB_CACHE`, `~/.cache/huggingface/hub` by default) and read
it from there afterwards; `"org/name@revision"` pins a branch, tag or commit. With
`HF_HUB_OFFLINE=1` (read at call time) or `local_files_only=True` only the cache is used.

`huggingface_hub` is imported inside the functions, so `import samed_adapter` stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .adapter_file.adapter import Adapter
from .volume.geometry import describe_orientation

if TYPE_CHECKING:  # pragma: no cover - typing only
    from huggingface_hub import CommitInfo, ModelCard

    from .evaluation.summary import Summary
    from .model import SAMed

from .adapter_file.hub_cache import (  # noqa: F401 - re-exported: resolving Hub ids lives below Adapter
    ADAPTER_FILENAME,
    LIBRARY_NAME,
    AdapterNotFoundError,
    HubCacheError,
    HubUnreachableError,
    check_revision,
    hf_hub_adapter_path,
    hub_endpoint,
    parse_repo_id,
)
from .io.paths import looks_like_repo_id

TAGS = ["medical-imaging", "image-segmentation", "lora", "samed", "segment-anything"]
# backbone -> (Hub id of the stock weights, Meta's stock checkpoint file)
STOCK_SAM = {
    "vit_b": ("facebook/sam-vit-base", "sam_vit_b_01ec64.pth"),
    "vit_l": ("facebook/sam-vit-large", "sam_vit_l_0b3195.pth"),
    "vit_h": ("facebook/sam-vit-huge", "sam_vit_h_4b8939.pth"),
}


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when no connection is made (as opposed to an HTTP error answer).

    Its HTTP client changed between versions (requests, httpx, httpx2); the one it imported is
    in `sys.modules`, so nothing is imported here.
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    requests = sys.modules.get("requests.exceptions")
    if requests is not None:
        errors += [requests.ConnectionError, requests.Timeout]
    return tuple(errors)


def _resolve_adapter(source: Union[Adapter, "SAMed", str, os.PathLike]) -> tuple[Adapter, Optional[Path]]:
    """The adapter to push, and the file to upload as-is when `source` is a path."""
    from .model import SAMed

    if isinstance(source, Adapter):
        return source, None
    if isinstance(source, SAMed):
        return source.adapter(), None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no adapter file at {path}; push takes an Adapter, a SAMed model or a file path")
        return Adapter.load(path), path
    raise TypeError(f"push_to_hub takes an Adapter, a SAMed model or a file path, got {type(source).__name__}")


def _base(adapter: Adapter, base_model: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(Hub id of the stock weights, stock checkpoint file name) for the card."""
    hub_id, checkpoint = STOCK_SAM.get(adapter.config.backbone or "", (None, None))
    if base_model:
        if looks_like_repo_id(base_model):
            hub_id = base_model
        else:
            checkpoint = os.path.basename(base_model)
    return hub_id, checkpoint


def _evaluation_metadata(summary: "Summary") -> dict[str, Any]:
    def num(v: Optional[float]) -> Optional[float]:
        return None if v is None else round(float(v), 6)

    return {
        "cases": len(summary.cases),
        "mean_dice": num(summary.mean_dice),
        "mean_hd95": num(summary.mean_hd95),
        "classes": [
            {"name": n, "dice": num(d), "hd95": num(h)}
            for n, d, h in zip(summary.class_names, summary.class_dice, summary.class_hd95)
        ],
    }


def model_card(
    adapter: Adapter,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    evaluation: Union["Summary", str, None] = None,
) -> "ModelCard":
    """The README model card `push_to_hub` uploads.

    Args:
        adapter: the adapter it describes.
        repo_id: where it is pushed (used in the usage examples).
        base_model: a Hub id of the stock SAM weights (`"facebook/sam-vit-base"`) or the stock
            checkpoint's file name (`"sam_vit_b_01ec64.pth"`); default: from the backbone.
        evaluation: a `summary.Summary` (a table in the card and its numbers in the metadata)
            or a Markdown string (shown as given).
    """
    from huggingface_hub import ModelCard, ModelCardData

    cfg = adapter.config
    backbone = cfg.backbone or "vit_b"
    hub_id, checkpoint = _base(adapter, base_model)
    extra: dict[str, Any] = {
        "backbone": cfg.backbone, "base_checkpoint": checkpoint, "base_fingerprint": adapter.base_fingerprint,
        "num_classes": cfg.num_classes, "class_names": list(cfg.class_names or []),
        "image_size": cfg.image_size, "adapter_config": json.loads(cfg.to_json()),  # plain YAML types
    }
    evaluation_text: Optional[str] = None
    if isinstance(evaluation, str):
        evaluation_text = evaluation.strip() or None
    elif evaluation is not None:
        from .evaluation.summary import Summary  # imported only here: metrics needs medpy

        if not isinstance(evaluation, Summary):
            raise TypeError(f"evaluation must be a metrics Summary or a Markdown string, got {type(evaluation).__name__}")
        extra["evaluation"] = _evaluation_metadata(evaluation)
        evaluation_text = (f"Mean over {len(evaluation.cases)} cases (Dice in %, HD95 as computed).\n\n"
                           + evaluation.means_markdown().rstrip())
    data = ModelCardData(
        library_name=LIBRARY_NAME, tags=list(TAGS), pipeline_tag="image-segmentation", base_model=hub_id,
        **{k: v for k, v in extra.items() if v is not None},
    )
    ckpt = checkpoint or "<stock SAM checkpoint>"
    build = (f'sam_model_registry["{backbone}"](checkpoint="{ckpt}")' if backbone in STOCK_SAM
             else f'samed_adapter.build_sam("{backbone}", checkpoint="{ckpt}")')
    names = ["background", *(cfg.class_names or [])]
    if cfg.intensity_window is not None:
        window = "window [{:g}, {:g}] (raw values are clipped to it and scaled to [0, 1])".format(*cfg.intensity_window)
    elif cfg.intensity_percentiles is not None:
        window = ("percentile normalisation [{:g}, {:g}] (each volume clipped to its own percentiles and scaled "
                  "to [0, 1])").format(*cfg.intensity_percentiles)
    else:
        window = "none (inputs must already be in [0, 1])"
    body = [
        f"# SAMed adapter `{repo_id}`", "",
        "A [SAMed](https://arxiv.org/abs/2304.13785) adapter for the `samed-adapter` library. Patched onto a "
        f"stock Segment Anything Model ({backbone}, weights `{ckpt}`), it makes SAM an automatic semantic "
        f"segmenter for {cfg.num_classes} classes, without prompts: a rank-{cfg.rank} LoRA on the image "
        "encoder's query and value projections, plus the fine-tuned prompt embedding and mask decoder.", "",
        f"This repository holds only `{ADAPTER_FILENAME}` ({adapter.num_parameters:,} values, "
        f"{adapter.nbytes / 2**20:.2f} MiB in {str(adapter.dtype).replace('torch.', '')}); the stock SAM "
        f"weights are not included. The adapter only patches the stock weights with fingerprint "
        f"`{adapter.base_fingerprint}`.", "",
        "## How to use", "", "```python",
        *(["from segment_anything import sam_model_registry"] if backbone in STOCK_SAM else []),
        "import samed_adapter", "",
        f"sam = {build}",
        f'model = samed_adapter.patch(sam, "{repo_id}")  # downloads once, then uses the cache',
        'labels = model.segment("scan.nii.gz")  # a label image on the scan\'s own voxel grid',
        *(['session = model.interactive("scan.nii.gz")  # then refine one class from clicks:',
           f'labels = session.click("{names[1]}", (i, j, k), positive=True)'] if cfg.clicks else []),
        "```", "",
        "From the command line:", "", "```bash",
        f"samed-adapter segment --sam {ckpt} --adapter {repo_id} scan.nii.gz -o labels/", "```", "",
        "## Classes", "", "| label | class |", "|---:|---|",
        *(f"| {i} | {n} |" for i, n in enumerate(names)), "",
        "## Configuration", "",
        f"Input size {cfg.image_size}; intensity preprocessing: {window}; orientation: "
        f"{describe_orientation(cfg)}; decoder LoRA "
        f"{'rank ' + str(cfg.decoder_lora_rank) if cfg.decoder_lora else 'no'}; clicks: "
        f"{'yes, any class can be refined from clicks after the automatic labels' if cfg.clicks else 'no'}.", "",
        "```json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True), "```",
    ]
    if evaluation_text:
        body += ["", "## Evaluation", "", evaluation_text]
    text = "\n".join(body)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def push_to_hub(
    adapter_or_model_or_path: Union[Adapter, "SAMed", str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    evaluation: Union["Summary", str, None] = None,
    base_model: Optional[str] = None,
) -> "CommitInfo":
    """Upload an adapter and its model card to a Hub model repository, creating it if needed.

    One commit adds `adapter.safetensors` and `README.md` (replacing earlier versions of both;
    other files in the repository stay).

    Args:
        adapter_or_model_or_path: an Adapter, a patched SAMed model (its current adapter) or an
            adapter file (uploaded byte for byte after it is checked).
        repo_id: `"org/name"` (or `"org/name@branch"`).
        token: a Hub token with write access (default: the saved login or `HF_TOKEN`).
        private: make a new repository private (None: the account's default).
        revision: the branch to commit to; created from `main` if missing.
        commit_message: default: "Upload SAMed adapter (K classes, backbone)".
        create_pr: open a pull request instead of committing directly.
        evaluation: a `summary.Summary` or a Markdown string for the card's evaluation section.
        base_model: the stock SAM: a Hub id (`"facebook/sam-vit-base"`) or the stock checkpoint's
            file name; default: the one of the adapter's backbone.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`.commit_url`, `.pr_url`).

    Raises:
        HubUnreachableError: no connection to the Hub (HF_ENDPOINT) could be made, or offline
            mode is on; nothing was pushed.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (not logged in, no write access).
    """
    import huggingface_hub

    repo, revision = parse_repo_id(repo_id, revision)
    adapter, source_file = _resolve_adapter(adapter_or_model_or_path)
    card = model_card(adapter, repo, base_model=base_model, evaluation=evaluation)
    message = commit_message or (
        f"Upload SAMed adapter ({adapter.config.num_classes} classes, {adapter.config.backbone or 'any backbone'})"
    )
    api = huggingface_hub.HfApi(endpoint=hub_endpoint())  # HF_ENDPOINT as set now, as for pulls
    try:
        api.create_repo(repo, token=token, private=private, repo_type="model", exist_ok=True)
        if revision is not None and not revision.startswith("refs/"):
            api.create_branch(repo, branch=revision, token=token, repo_type="model", exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="samed-adapter-push-") as tmp:
            folder = Path(tmp)
            if source_file is not None:
                shutil.copyfile(source_file, folder / ADAPTER_FILENAME)
            else:
                adapter.save(folder / ADAPTER_FILENAME)
            card.save(folder / "README.md")
            return api.upload_folder(
                repo_id=repo, folder_path=folder, repo_type="model", revision=revision,
                commit_message=message, create_pr=create_pr, token=token,
            )
    except _connection_errors() as err:
        from huggingface_hub.errors import OfflineModeIsEnabled

        if isinstance(err, OfflineModeIsEnabled):
            what = "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"
        else:
            what = (f"the Hub at {hub_endpoint()} could not be reached ({str(err).strip() or type(err).__name__}); "
                    "connect to the network, or set HF_ENDPOINT to a reachable Hub")
        raise HubUnreachableError(f"nothing was pushed to {repo}: {what}") from None
