"""gnaq-stream: streaming graph collaborative filtering with node-aware quantized embeddings."""

__version__ = "0.1.0"
