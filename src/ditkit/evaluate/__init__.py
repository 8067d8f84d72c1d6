"""Measuring models and samples: FLOPs, and (later) sample-quality metrics."""
from ditkit.evaluate.flops import count_params, forward_gflops, zoo_table

__all__ = ["count_params", "forward_gflops", "zoo_table"]
