"""Models: loading, response log-probs, prefix sharing, LoRA, FSDP, compilation, saving, GGUF conversion."""
