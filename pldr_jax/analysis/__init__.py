"""Invariance analysis of PLDR-LLM deductive outputs (A, A_LM, A_P, G_LM) along generations.

Metrics are pure NumPy float64 functions (``invariance``); ``deductive_trace`` collects the
deductive outputs of a model in cached and uncached modes; ``report`` writes tidy tables (CSV,
markdown); ``plots`` draws heatmaps and drift curves; ``cli`` is ``pldr-jax analyze``.
"""

from .invariance import (DeductiveTrace, InvarianceResult, analyze_trace, compare_runs, dag_per_layer,
                         dag_values, deductive_trace, determinant, head_spread,
                         matching_decimals, numerical_rank, order_parameter, pad_prompts, rmse, slogdet,
                         tensor_head_spread)
from .report import comparison_rows, summary_rows, to_csv, to_markdown, trace_rows, write_csv, write_markdown

__all__ = ["DeductiveTrace", "InvarianceResult", "analyze_trace", "compare_runs", "dag_per_layer",
           "dag_values", "deductive_trace", "determinant", "head_spread",
           "matching_decimals", "numerical_rank", "order_parameter", "pad_prompts", "rmse", "slogdet",
           "tensor_head_spread", "comparison_rows", "summary_rows", "to_csv", "to_markdown", "trace_rows",
           "write_csv", "write_markdown", "run_analysis"]


def run_analysis(*args, **kwargs):
    """See ``pldr_jax.analysis.cli.run_analysis`` (imported lazily: it pulls in matplotlib)."""
    from .cli import run_analysis as _run
    return _run(*args, **kwargs)
