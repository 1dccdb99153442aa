"""Built-in plugin `normsparse` (work in progress: registers nothing yet)."""
