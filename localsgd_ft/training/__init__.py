"""The training plane: one replica group's trainer and its collaborators (torch, torchft)."""
