"""Evaluation: confusion-matrix metrics, scoring of infer-scene's stitched maps, multi-seed statistics."""
