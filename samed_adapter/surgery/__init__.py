"""Stock SAM <-> SAMed: structure (what is replaced and kept), transfer (values in and out), packing, LoRA layers, SDPA attention; imports the stages below it (volume .. kernels)."""
