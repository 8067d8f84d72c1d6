"""Measuring models and samples: FLOPs, and sample-quality metrics (FD, precision/recall, IS)."""
from ditkit.evaluate.flops import count_params, forward_gflops, zoo_table
from ditkit.evaluate.metrics import (evaluate, feature_stats, frechet_distance, frechet_distance_from_features,
                                     inception_score, load_samples, precision_recall)

__all__ = ["count_params", "forward_gflops", "zoo_table", "evaluate", "feature_stats", "frechet_distance",
           "frechet_distance_from_features", "inception_score", "load_samples", "precision_recall"]
