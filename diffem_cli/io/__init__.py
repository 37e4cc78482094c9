"""Files on disk: data sets, safetensors files, locks, data sources, observations, channels."""
