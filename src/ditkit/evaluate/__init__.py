"""Measuring models and samples: FLOPs, sample-quality metrics (FD, precision/recall, IS), and the quality
of moving-MNIST clips (frame accuracy, clip consistency, motion, per-frame FD)."""
from ditkit.evaluate.flops import count_params, forward_gflops, zoo_table
from ditkit.evaluate.metrics import (evaluate, feature_stats, frechet_distance, frechet_distance_from_features,
                                     inception_score, load_samples, precision_recall)
from ditkit.evaluate.video import centre_of_mass, evaluate_clips, frame_classes, frame_views, motion_steps, real_clips

__all__ = ["count_params", "forward_gflops", "zoo_table", "evaluate", "feature_stats", "frechet_distance",
           "frechet_distance_from_features", "inception_score", "load_samples", "precision_recall", "centre_of_mass",
           "evaluate_clips", "frame_classes", "frame_views", "motion_steps", "real_clips"]
