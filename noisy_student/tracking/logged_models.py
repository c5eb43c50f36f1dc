"""What a training logs to its MLflow run that needs torch: the model itself and a batch picture.

Apart from runs.py (MLflow alone), so the stages that only read runs need not import torch.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from noisy_student.models.card import ModelCard
from noisy_student.models.classifier import Classifier


def log_model(nets: list[torch.nn.Module], card: ModelCard) -> None:
    """Log a self-contained model: float pixels in 0..255, N x 3 x H x W -> logits (an
    ensemble's: the log of its averaged probabilities).

    Saved as a torch.export (pt2) program, which loads without unpickling code.
    """
    import copy

    import timm

    # contiguous weights: torch.export's archive warns on channels_last ones ("No complete
    # tensor found in the group"), and whoever loads the model picks its own format
    contiguous = torch.contiguous_format
    classifier = Classifier(
        [copy.deepcopy(net).cpu().to(memory_format=contiguous) for net in nets],
        [m.mean for m in card.members],
        [m.std for m in card.members],
    ).eval()
    # two images, so torch.export keeps the batch dimension dynamic
    example = np.zeros((2, 3, card.image_size, card.image_size), dtype=np.float32)
    mlflow.pytorch.log_model(
        classifier,
        name="model",
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
        metadata={
            "classes": card.classes,
            "image_size": card.image_size,
            "eval_crop_pct": card.eval_crop_pct,
        },
        # MLflow would load the model back and run it on the example (1-2 s a training); the
        # registry's tests load it and compare its predictions with the checkpoint's instead
        validate_serving_input=False,
    )


def log_batch_image(batch: torch.Tensor, artifact_file: str = "train_batch.png") -> None:
    """The first training batch as the model sees it (augmented, mixed), up to 64 images, as a
    picture in the active run: check that an augmented image still shows its class."""
    from torchvision.utils import make_grid

    grid = make_grid(batch[:64], nrow=8, padding=1).permute(1, 2, 0).numpy()
    scale = max(1, 256 // batch.shape[-1])  # small images: enlarge, without smoothing
    mlflow.log_image(np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8)), artifact_file)
