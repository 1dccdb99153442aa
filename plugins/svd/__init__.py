"""Built-in plugin `svd` (work in progress: registers nothing yet)."""
