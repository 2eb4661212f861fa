"""Fine-tuning a PLDR-LLM: task heads (`pldr_jax.heads`) and supervised fine-tuning (SFT).

`data`: records (JSONL / Parquet / Hugging Face `datasets`) -> checked, tokenised arrays;
`tasks`: small task sets made from the embedded corpus (offline); `metrics`: accuracy / macro-F1,
entity-level P/R/F1 (BIO), exact match / F1, response loss / perplexity; `step`: the objectives,
frozen leaves (`--freeze-decoder`, `--fixed-g`) and the jitted steps on pretraining's mesh and
sharding rules; `loop`: the run through pretraining's step loop, reporter (progress bar,
metrics.jsonl, plot, summary), checkpoints and resume, then the HF export; `cli`: `pldr-jax finetune`.
"""
