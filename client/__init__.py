"""The Python client and the ``pcd`` command line of the PCD distillation service.

Speaks to the service over HTTP only (DESIGN.md: ``client -> (HTTP only)``): it imports none
of ``api``, ``jobs``, ``worker`` or ``pcd_core`` at module import, so ``pip install`` of the
client side never needs torch. ``pcd serve`` starts the service as subprocesses for the same
reason.
"""

from client.api import PcdClient, PcdError, SseEvent

__all__ = ["PcdClient", "PcdError", "SseEvent"]
