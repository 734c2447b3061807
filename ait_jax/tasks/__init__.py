"""One module per task: vocabulary slice, sequences, losses, decoding, post-processing."""
