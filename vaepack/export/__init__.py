"""Export a model part to ONNX (``onnx``: export_onnx, cached_export), check it against PyTorch
(``parity``), wrap the network for export (``graph``) and build TensorRT engines (``trt``).

Precisions and tolerances are documented in export/README.md and in ``vaepack.export.onnx``.
"""
