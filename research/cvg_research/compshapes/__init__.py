"""CompShapes: a synthetic compositional video world with a programmatic judge."""
