"""Fault-tolerant LocalSGD on CIFAR-10 with torchft, launched by torchx.

Floors, each importing only from those below it (``tests/test_layers.py`` holds it):

- ``config``: the experiment schema;
- ``contract``: the records and names that cross process boundaries;
- ``storage``: files and their formats (atomic writes, checkpoints, CIFAR-10);
- ``results``: metrics, summary.json, report, compare, sweep (no torch);
- ``launch``: the roles and the completion service (no torch);
- ``training``: one replica group's trainer (torch).

The modules at this level are the command lines (``python -m localsgd_ft.X``).
"""
