"""The stock models: backbones (build, infer, load once), the SAM and SAM 2 hosts, random weights for demos; imports volume, io and adapter_file."""
