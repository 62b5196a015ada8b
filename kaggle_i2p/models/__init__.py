"""The models: backbones by library (one module each), checkpoints, towers, and the MiniLM text model."""
