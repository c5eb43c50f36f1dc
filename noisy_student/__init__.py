"""Noisy Student self-training for image classification: the library behind the pipeline.

One subpackage per concern: ``core`` (settings, layout, errors, atomic writes, progress, the
entry points' plumbing), ``data`` (image files and prepared splits), ``augment``, ``models``
(timm models, transfer learning, inference, ONNX), ``losses`` (distillation, mixing),
``training`` (the loop, resume, DDP), ``pseudo_labels``, ``evaluation``, ``tracking`` (MLflow runs
and registry) and ``report``. It never imports ``tasks/`` or ``flows/``.
"""
