"""Fault-tolerant LocalSGD on CIFAR-10 with torchft, launched by torchx.

Modules: ``config`` (the YAML schema), ``data`` (CIFAR-10 as tensors),
``model``, ``trainer`` (one replica group's loop), ``lighthouse`` and
``replica`` (the two torchx roles), ``control`` (how groups report their end),
``roles`` (addresses shared by the component and the roles), ``files``.

Importing the package does not import torch: the lighthouse role stays small.
"""
