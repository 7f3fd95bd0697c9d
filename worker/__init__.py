"""The worker role: runs the app's handlers and the activations of durable objects.

User code imports the handler SDK from :mod:`wsgate` (``from wsgate import App,
DurableObject, ...``), which is the one list of public names; the modules here are the
implementation. :class:`wsgate.worker.runtime.Worker` is the role's entry point.
"""
