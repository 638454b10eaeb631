"""vbatch: the OpenAI Batch API on your own cluster, executed by vLLM."""

__version__ = "0.1.0"
