"""Engines that only detectors use: per-sample gradients (``persample``, LDG), input views
(``jigsaw``, FeatureNorm's block selection) and neighbour banks (``knn``, KNN and LDG)."""
