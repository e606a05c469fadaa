"""Training the CompShapes generator and the compositional classifier (dual inversion): resumable, chunked,
one writer per output."""
