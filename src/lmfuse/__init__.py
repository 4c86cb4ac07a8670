"""lmfuse: fuse the knowledge of several causal language models into one (FuseLLM)."""

__version__ = "0.1.0"
