"""``vaepack dataset``: resumable, sharded latent caching for training sets (issue 16).

Modules, bottom to top (import the one you need; this file imports nothing):

- ``plan``: inputs (folder, glob, text or Parquet list), units of K files, aspect-ratio buckets
  (``bucket_for``, a pure function of (w, h, spec)), the settings and their ``fingerprint``.
- ``shards``: one unit = one safetensors shard + errors file + done marker, written atomically;
  ``rebuild_index`` (JSON lines, Parquet when pyarrow is importable), ``dataset_info``, ``verify_dataset``.
- ``encode``: ``encode_unit``, the one unit-encoding function both engines run.
- ``local``: the worker-process engine; ``ray_engine``: the Ray Data engine (optional extra ``vaepack[ray]``).
- ``job``: ``encode_dataset``: plan, refuse a changed fingerprint, resume, run an engine, rebuild the index.
- ``reader``: ``LatentShards`` (a torch Dataset) and ``BucketBatchSampler`` for training.
"""
