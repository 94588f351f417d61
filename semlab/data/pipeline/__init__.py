"""The SSL input pipeline: DINOv2 multi-crop augmentation, iBOT block masking, collate into the
batch dict of the training step, and the two ways to stream it: the local torch ``DataLoader``
(``loaders``) and Ray Data (``ray_pipeline``, which uses Ray Data only: it never starts Ray).
"""
