"""Framework-specific implementations: `nlibert.backends.torch` and `nlibert.backends.mxnet`."""
