"""vlforge's method plugins, each registered through the ``vlforge.plugins`` entry-point group."""
