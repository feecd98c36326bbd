"""fxpress: a model-compression compiler for PyTorch."""
__version__ = "0.1.0"
