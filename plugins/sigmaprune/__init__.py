"""Built-in plugin `sigmaprune` (work in progress: registers nothing yet)."""
