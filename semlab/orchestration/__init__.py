"""Orchestration: Ray Train pretraining (TorchTrainer), Ray Tune sweeps, Ray cluster helpers.

Everything Ray-specific in semlab lives here (and in ``semlab.data.pipeline.ray_pipeline``); the training
step itself is torch only. Modules (imported on use, so ``import semlab.orchestration`` stays cheap):

- ``cluster``: start or join a Ray cluster (``ray.address``: auto | local | none | <address>);
- ``trainer``: ``build_trainer(cfg, output_dir, resume)`` -> ``ray.train.torch.TorchTrainer``, ``fit``;
- ``worker``: ``train_loop_per_worker`` (parallelize, data shard, ``do_train``, k-NN);
- ``reporter``: ``RayTrainReporter`` (``ray.train.report`` with checkpoints from every rank);
- ``tune``: ``run_sweep`` over ``student.L`` x ``student.temp``;
- ``launch``: the ``experiments/pretrain.py`` command line (``main(argv)``).
"""
