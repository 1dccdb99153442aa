"""Built-in plugin `selectors` (work in progress: registers nothing yet)."""
