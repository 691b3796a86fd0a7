"""Model code: model and tokenizer specs and head loading (models, tokenizers, paths), the FSDP2
student and its LoRA form (student, lora), vision-language parts (vision), vocabulary checks
between student and teacher (vocab). See docs/architecture.md."""
