"""Runtime backends and the artifacts they run: optional-dependency checks with install hints
(``optional``), ONNX/engine sidecars and the latent convention outside a graph (``artifacts``),
TensorRT optimization profiles (``profiles``) and the runners behind one interface (``runners``).

Nothing here exports or chooses: vaepack.export writes artifacts, vaepack.runtime picks a backend.
"""
