"""The README's main job as a script: `python experiments/main_job.py [pldr-jax train flags]`.

Same as `pldr-jax train --main-job`: trains a small PLDR-LLM (4 layers, d_model 192, learned G) on
the embedded corpus (pydoc topics + stdlib docstrings, no download) on the CPU in a few minutes,
saves an orbax checkpoint, reloads it and generates text with the KV- and G-cache, and prints the
loss-curve summary, the samples and where the files went (default ``runs/main-job``).
"""

import sys

from pldr_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--main-job", *sys.argv[1:]]))
