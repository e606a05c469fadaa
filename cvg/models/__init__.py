"""What knows diffusers and model internals: Wan loading and manifests, attention processors, the text
padding collapse, the CPU VAE decode, the MiniLM text encoder and the tiny test generators. Models know
nothing of classifiers or guidance objectives."""

# The precisions a transformer may be loaded in (`load_wan_pipeline(transformer_dtype=...)`), by torch name;
# kept here, without torch, for the command line.
PRECISIONS = ("float32", "bfloat16", "float16")
