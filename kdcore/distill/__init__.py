"""What a loss sees: the Aligner protocol with the batch types it receives (aligner) and the one
chunked driver, hidden states to logits per chunk to the registered loss (loss). See
docs/architecture.md."""
