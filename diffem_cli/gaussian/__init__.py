"""Gaussian priors: the closed-form EM start and the moments MMPS uses as its covariance."""
