"""Datasets and their sources: dataset strings and ``make_dataset``, ImageNet (``extra`` layout),
ImageFolder, the embedded demo, and Parquet shards (writing them: ``shards``; reading: ``parquet``).

Items are ``(transform(PIL image), label)``; every dataset also gives ``get_encoded(i)`` (the original
bytes), ``labels``, ``class_ids`` and ``class_names``. torch/PIL/pyarrow only, no Ray.
"""
