"""pcd_core: the PCD engine (models, data, distillation, training, metrics, export).

Pure PyTorch + numpy (+ scipy for the channel assignment). It knows nothing of HTTP,
Celery, SQL or object storage. This package's ``__init__`` deliberately imports nothing
heavy: ``pcd_core.spec`` and ``pcd_core.models.catalog`` are torch-free so that the API
process can validate job specs without loading torch.
"""

__version__ = "0.1.0"
