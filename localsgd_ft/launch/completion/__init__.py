"""The completion service: how replica roles and trainers talk to the lighthouse role.

Its state (``state``), its HTTP server (``server``) and its client (``client``);
every request and reply is a model of :mod:`localsgd_ft.contract`, which checks it.

The torchft lighthouse has no notion of a run that ends, so the lighthouse role
also serves this small JSON-over-HTTP API on ``lighthouse.completion_port``.
Every request must carry the run's token (header ``TOKEN_HEADER``): a process
of another run, or any other process that can reach the port, is refused (403).

- ``POST /heartbeat {"group": g, "node": n}``: node n (a replica of role g;
  0 when the group spans one node) is alive (every ``HEARTBEAT_S``); answers the status
  below. A node silent for ``lighthouse.role_timeout_s`` is declared lost, and
  with it its group.
- ``POST /started {"group": g, "incarnation": id}``: group g's Manager is up
  (heartbeating); answers ``{"restarts": n}``, how many incarnations of the
  group started before this one (a resent request counts once).
- ``POST /event {"group": g, "kind": ..., ...}``: something happened (an
  injected failure, a recovery, a checkpoint); stamped with the lighthouse's
  clock. Answers ``{"first": true}`` the first time a ``fault_id`` is
  reported, so each planned failure fires once, across restarts. A ``fault``
  event is accepted only for a failure of this run's plan.
- ``POST /completed {"group": g, "global_sync": n, "params_sha256": h}``:
  group g committed the final sync. From then on the run's training is over:
  a group that (re)starts takes the final state instead of training alone.
- ``POST /finished {"group": g, "node": n, "exit_code": c, "result": {...} | null}``:
  node n of group g: its torchrun has exited; ``result`` is what the group's
  trainer reported (a ``TrainerResult``), from the node
  that ran worker 0. The group has finished once every node has reported, or
  :data:`FAILED_GROUP_GRACE_S` after one reported a failure (a group is whole
  or not at all); a node that has not heartbeated since is blamed.
- ``GET /status``: a ``Status``.

Until the lighthouse role is ready (its ports bound, old outputs moved aside)
every request is answered 503 and clients retry. Bodies are capped at
:data:`MAX_BODY` bytes and connections time out after :data:`SOCKET_TIMEOUT_S`.
"""
