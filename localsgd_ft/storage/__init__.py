"""The files a run reads and writes, and their formats: atomic writes, durable checkpoints, CIFAR-10's files.

No torch at import time (checkpoints import it only to save or load), so the
launch plane can check a resume and find the data before anything trains.
"""
