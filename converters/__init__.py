"""Bridges between SEIF and frameworks (transformers/torch, JAX/Flax, ONNX).

Each converter module imports its framework lazily and registers itself with
`seif.convert` under a format name, so the core never imports a framework.
"""
