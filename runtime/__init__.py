"""The SEIF reference runtime (ONNX Runtime with `ai.seif` custom ops). Not built yet."""
