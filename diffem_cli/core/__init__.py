"""The lowest layer: errors, progress display, threads and the runtime (device, processes)."""
