"""Evaluation of frozen backbones: feature extraction, weighted k-NN (and, in their modules,
the linear probe and DLC export)."""

from semlab.eval.features import FEATURE_KINDS, extract_features, make_eval_transform
from semlab.eval.knn import knn_classify, topk_neighbours

__all__ = ["FEATURE_KINDS", "extract_features", "knn_classify", "make_eval_transform", "topk_neighbours"]
