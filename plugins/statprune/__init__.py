"""Built-in plugin `statprune` (work in progress: registers nothing yet)."""
