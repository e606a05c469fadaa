"""Files, videos and the native extension: atomic writes, locks, frame packing. Imports nothing else of cvg."""
