"""Getting into a model: loading, model facts, sites, reducers, edits and the backends that run them."""
