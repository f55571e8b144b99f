"""The launch and control plane: addresses, the lighthouse role, the completion service, the replica role.

No torch: these processes stay small (the lighthouse role takes about 30 MB).
"""
