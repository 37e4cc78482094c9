"""What each command does, as functions: corrupt, the EM driver, reconstruct, train-uncond, compare,
export, report."""
