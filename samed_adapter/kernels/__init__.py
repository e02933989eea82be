"""Fused kernels: the q/v LoRA bypass on SAM's qkv projection (Triton on CUDA, torch elsewhere); imports nothing of this package.

Nothing here imports Triton at import time; `dispatch` loads `triton_lora_qkv` (the Triton
kernels) on the first CUDA call. (That module is not named `lora_qkv`: importing a submodule sets
the package attribute of its name, which would replace the `lora_qkv` function exported here.)
"""

from .dispatch import (
    ENV_VAR,
    kernels_enabled,
    lora_qkv,
    lora_qkv_multi,
    row_adapter_index,
    triton_available,
)
from .fallback import block_up_weight, lora_qkv_multi_torch, lora_qkv_torch

__all__ = [
    "ENV_VAR",
    "block_up_weight",
    "kernels_enabled",
    "lora_qkv",
    "lora_qkv_multi",
    "lora_qkv_multi_torch",
    "lora_qkv_torch",
    "row_adapter_index",
    "triton_available",
]
