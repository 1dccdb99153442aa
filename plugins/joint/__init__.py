"""Built-in plugin `joint` (work in progress: registers nothing yet)."""
