"""Context parallelism for the VLM: the sequence split, vision work split across ranks."""
