"""Training recipes: `TrainConfig` field defaults by name (the CLI's flags override them), and the
recipe each model preset trains with by default.  Their own module (no imports) so that the CLI and
`pldr_jax.aot` read them without importing the training loop."""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "PRESET_RECIPE"]

#: Training recipes: TrainConfig field defaults (flags override them).
RECIPES: dict[str, dict[str, Any]] = {
    # the paper's: AdamW(0.9, 0.95, eps 1e-5, wd 0.1), clip by value 1.0, warm-up 2000, cosine to 10% at 250k
    "paper": dict(learning_rate=1e-3, warmup_steps=2000, total_steps=250_000, steps=250_000, alpha=0.1,
                  weight_decay=0.1, clip_value=1.0, batch_size=32, seq_len=1024, data_mode="pack",
                  log_every=100, eval_every=12_000, eval_batches=2000, save_every=4000, keep_checkpoints=3),
    # the authors' DAG-regularised v510 training script: lr 1.5e-3 and DAG coefficients 0.05 each
    "paper-dag": dict(learning_rate=1.5e-3, warmup_steps=2000, total_steps=250_000, steps=250_000, alpha=0.1,
                      weight_decay=0.1, clip_value=1.0, batch_size=32, seq_len=1024, data_mode="pack",
                      dag_coeffs=(0.05, 0.05, 0.05), log_every=100, eval_every=12_000, eval_batches=2000,
                      save_every=4000, keep_checkpoints=3),
    # small models on a CPU
    "cpu": dict(learning_rate=1e-3, warmup_steps=50, steps=1000, alpha=0.1, weight_decay=0.1, clip_value=1.0,
                batch_size=16, seq_len=128, log_every=10, eval_every=100, eval_batches=20, save_every=250,
                keep_checkpoints=3),
}
PRESET_RECIPE = {"v51-110m": "paper", "v51-dag-110m": "paper-dag", "v51g-106m": "paper", "v51-1b": "paper",
                 "v51-8b": "paper"}
