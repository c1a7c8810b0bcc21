"""agcl_ds: continual fine-tuning of LLMs with attribution-guided gradient modulation on DeepSpeed."""

__version__ = "0.1.0"
