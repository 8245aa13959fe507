"""RayPress: Ray-based search for dynamic, non-uniform LLM compression."""

__version__ = "0.1.0"
