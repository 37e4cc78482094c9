"""Gaussian priors: the closed-form EM start (lap 0) and the moments MMPS uses as its covariance.

``linalg`` (conjugate gradients, Woodbury, coordinate maps, PCA) < ``prior`` (``GaussianPrior``)
and ``operators`` (how a channel's ``A`` is applied, classified and materialised) < ``posterior``
(exact moments, samples and means) < ``fit`` (the EM fit and ``gaussian_start``); ``moments`` fits
a prior to clean samples for MMPS.
"""
