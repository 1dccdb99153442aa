"""The recipes shipped with netshrink, as package data: ``netshrink compress --recipe NAME``
finds ``NAME.yaml`` here (``netshrink recipes`` lists them). In a checkout this is the
``recipes/`` folder, mapped to ``netshrink.recipes`` by ``package-dir`` in pyproject.toml."""
