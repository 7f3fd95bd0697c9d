"""The state service: durable objects' storage, served over gRPC (``wsgate.v1.State``).

:mod:`wsgate.stateservice.server` is the role (:class:`~wsgate.stateservice.server.StateServer`),
:mod:`wsgate.stateservice.storage` keeps the data in SQLite, :mod:`wsgate.limits` holds
the documented limits, and :mod:`wsgate.state_errors` maps refusals to gRPC statuses and
back; workers reach the service through :mod:`wsgate.worker.state_client`.
"""
