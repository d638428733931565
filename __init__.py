"""nlibert: the d2l chapter "Natural Language Inference: Fine-Tuning BERT" on MXNet Gluon and PyTorch."""
__version__ = "0.1.0"
