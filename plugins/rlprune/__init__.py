"""Built-in plugin `rlprune` (work in progress: registers nothing yet)."""
