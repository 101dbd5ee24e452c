"""Factorization passes: SVD (linear, matmul), Tucker-2 and CP (conv2d), tensor-train (linear)."""
from .config import METHODS, LowRank
from .cp import CPFactorize
from .svd import SVDFactorize
from .tensor_train import TTFactorize
from .tucker import TuckerFactorize

__all__ = ["LowRank", "METHODS", "SVDFactorize", "TuckerFactorize", "CPFactorize", "TTFactorize"]
