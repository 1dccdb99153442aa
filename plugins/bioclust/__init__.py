"""Built-in plugin `bioclust` (work in progress: registers nothing yet)."""
