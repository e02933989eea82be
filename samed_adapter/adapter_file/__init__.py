"""What an adapter is: AdapterConfig, Adapter, the safetensors reader, checkpoints read without code execution, Hub ids to cached files; imports volume and io."""
