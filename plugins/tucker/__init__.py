"""Built-in plugin `tucker` (work in progress: registers nothing yet)."""
