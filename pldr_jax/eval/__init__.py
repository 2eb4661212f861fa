"""Evaluation: perplexity, multiple-choice scoring by log-likelihood, and an lm-evaluation-harness
adapter (``PLDRLM``).  See ``multiple_choice`` for the scoring modes ("full", "cached", "causal")."""

from .harness import HAS_LM_EVAL, PLDRLM
from .multiple_choice import (MODES, MCResult, encode_pair, load_jsonl, loglikelihood_tokens, make_encoder,
                              score_multiple_choice)
from .perplexity import (PerplexityResult, doc_loglikelihoods, perplexity_of_dataset, perplexity_of_file,
                         perplexity_of_texts, perplexity_of_tokens, read_documents, rolling_windows)

__all__ = ["PLDRLM", "HAS_LM_EVAL", "MODES", "MCResult", "encode_pair", "load_jsonl", "loglikelihood_tokens",
           "make_encoder", "score_multiple_choice", "PerplexityResult", "doc_loglikelihoods", "perplexity_of_tokens",
           "perplexity_of_dataset", "perplexity_of_file", "perplexity_of_texts", "read_documents",
           "rolling_windows"]
