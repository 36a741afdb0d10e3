"""The engine of ``vaepack bench``: latency, throughput, cost and quality of VAE parts.

Modules, bottom to top (import the one you need; this file imports nothing):

- ``machine``: what the numbers were measured on (``machine_info``) and the memory probe (``PeakMemory``).
- ``schema``: the result document (version ``SCHEMA_VERSION``, documented in benchmarks/README.md):
  ``validate``, ``to_json``, ``save``, ``load``.
- ``inputs``: what every measurement shares: the model cache, the ``--data`` images, mean metrics.
- ``run``: ``run_bench``, one timed row per (model, precision, backend, part, size, scale, batch[, nfe]);
  backends are ``TimedCall`` factories (``register_backend``).
- ``rd``: ``run_rd``, rate-distortion of stored latents next to JPEG and WebP.
- ``report``: ``to_markdown`` and ``plot`` (the charts are drawn by ``vaepack.plots``, matplotlib,
  shared with ``vaepack.analysis`` and ``vaepack.tune``).
- ``suites``: named suites in benchmarks/suites/*.yaml (``load_suite``, ``run_suite``).

``run_bench``/``run_rd`` return a plain dict (the JSON document); the CLI only parses options.
"""
