"""The diffusion model: schedule, networks, denoisers, losses, the sampling and training loops."""
