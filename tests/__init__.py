"""vlmkit's test suite (a package, so that `tests.*` helpers resolve here before any installed `tests`)."""
