"""The pipeline's stages, one module each: a stage is a function of its config section and input paths
that returns its output path."""
