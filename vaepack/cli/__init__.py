"""The ``vaepack`` command, one module per command group (app.py assembles them and maps errors).

Importing this package imports nothing: ``vaepack.cli.app:main`` is the entry point.
"""
