"""Inference: the one Predictor, the stitcher, infer-scene, bundles, serving, scene ranking, post-processing."""
