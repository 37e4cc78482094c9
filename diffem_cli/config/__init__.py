"""Run configuration: typed sections, presets, ``--set`` overrides and their validation."""
