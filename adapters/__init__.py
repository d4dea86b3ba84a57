"""Framework adapters for ckptmgr, installed as ``ckptmgr.adapters``.

They use only ckptmgr's public API. Each submodule imports its framework lazily, so
``import ckptmgr`` never needs TensorFlow or PyTorch.
"""
