"""Built-in plugin `quantize` (work in progress: registers nothing yet)."""
