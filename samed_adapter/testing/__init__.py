"""Helpers for tests, benchmarks and demos that have no trained adapter at hand; may import any stage, and only tests, benchmarks and demos import it.

- `random_adapter`: an adapter whose every trainable tensor moved off its start;
- `same_tensors`: two adapters hold the same tensors, bit for bit;
- `snapshot` / `differences` / `assert_unchanged`: what a SAM is, to check that an operation
  left it exactly as it was;
- `samed_adapter.testing.tiny`: a tiny random SAM, images and adapter configurations for it;
- `samed_adapter.testing.hub`: a Hub cache laid out on disk and a recording HfApi (no network);
- `samed_adapter.testing.soak`: the hot-swap soak (`benchmarks/soak_swap.py`);
- `samed_adapter.testing.fuzz_files`, `samed_adapter.testing.mutations` and `samed_adapter.testing.fuzz`: the
  adapter-loading fuzz (the valid files, the ways of breaking them, the harness).

torch is imported on first use, so that a process that only reads fuzz results does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from segment_anything.modeling import Sam
    from torch import nn

    from ..adapter_file.adapter import Adapter
    from ..adapter_file.config import AdapterConfig

__all__ = ["assert_unchanged", "differences", "random_adapter", "same_tensors", "snapshot"]


def random_adapter(sam: "Sam", config: "AdapterConfig", *, seed: int = 0, scale: float = 0.05) -> "Adapter":
    """An adapter for stock `sam` whose every trainable tensor is moved randomly off its start.

    Not a trained model: a fresh adapter is a no-op in the encoder (LoRA B = 0), which would let
    tests of patching pass trivially. `sam` is patched and unpatched again, so it ends stock.
    """
    import torch

    from ..patching import inject, unpatch

    torch.manual_seed(seed)
    model = inject(sam, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    adapter = model.adapter()
    unpatch(sam)
    return adapter


def same_tensors(a: "Adapter", b: "Adapter") -> bool:
    """Whether two adapters hold tensors of the same names and values (torch.equal each)."""
    import torch

    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def snapshot(module: "nn.Module") -> dict[str, Any]:
    """Everything an operation that must change nothing could change: state_dict tensors and
    buffers (copies), module names, types and train/eval flags, and parameter names,
    requires_grad flags and dtypes."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in module.named_buffers()},
        "modules": [(name, type(m), m.training) for name, m in module.named_modules()],
        "params": [(name, p.requires_grad, p.dtype) for name, p in module.named_parameters()],
    }


def differences(module: "nn.Module", before: dict[str, Any]) -> list[str]:
    """What differs between `module` and a `snapshot` of it (empty: identical)."""
    import torch

    now = snapshot(module)
    problems = []
    if list(now["state"]) != list(before["state"]):
        problems.append(f"state_dict keys differ: {sorted(set(now['state']) ^ set(before['state']))[:5]}")
    problems += [
        f"{k} differs" for k, v in before["state"].items()
        if k in now["state"] and not (now["state"][k].dtype == v.dtype and now["state"][k].shape == v.shape
                                      and torch.equal(now["state"][k], v))
    ]
    if list(now["buffers"]) != list(before["buffers"]):
        problems.append("buffer names differ")
    problems += [f"buffer {k} differs" for k, v in before["buffers"].items()
                 if k in now["buffers"] and not torch.equal(now["buffers"][k], v)]
    if now["modules"] != before["modules"]:
        problems.append("module names, types or train/eval flags differ")
    if [(n, d) for n, _, d in now["params"]] != [(n, d) for n, _, d in before["params"]]:
        problems.append("parameter names or dtypes differ")
    elif now["params"] != before["params"]:
        problems.append("requires_grad flags differ")
    return problems


def assert_unchanged(module: "nn.Module", before: dict[str, Any]) -> None:
    """AssertionError naming what differs between `module` and a `snapshot` of it."""
    problems = differences(module, before)
    assert not problems, "; ".join(problems[:10])
