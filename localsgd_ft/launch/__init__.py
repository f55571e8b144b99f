"""The launch and control plane: addresses, the lighthouse role, the completion service, the replica role.

No torch: these processes stay small. The lighthouse role and its torchft child each peak at about 37 MB
(measured: VmHWM during configs/smoke.yaml, Dec 2026), where importing torch would cost about 600 MB.
"""
