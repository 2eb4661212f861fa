"""Fine-tuning a PLDR-LLM: task heads (`pldr_jax.heads`) and supervised fine-tuning (SFT).

`data`: records (JSONL / Parquet / Hugging Face `datasets`) -> checked, tokenised arrays;
`tasks`: small task sets made from the embedded corpus (offline); `metrics`: accuracy / macro-F1,
entity-level P/R/F1 (BIO), exact match / F1, response loss / perplexity; `loop`: the training run
(project optimiser, orbax checkpoints that resume exactly, metrics.jsonl, HF export); `cli`:
`pldr-jax finetune`.
"""
