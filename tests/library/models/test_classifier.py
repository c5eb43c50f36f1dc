"""The Classifier's outputs: probabilities, free energy and the members' features from one pass."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("architecture", ["resnet10t", "vit_tiny_patch16_224"])
def test_outputs_with_features_are_those_of_the_plain_forward_plus_unit_feature_rows(architecture):
    import timm

    from noisy_student.models.classifier import Classifier

    torch.manual_seed(0)
    nets = [timm.create_model(architecture, num_classes=3, img_size=32)
            if architecture.startswith("vit") else timm.create_model(architecture, num_classes=3)
            for _ in range(2)]  # fmt: skip
    classifier = Classifier(nets, [[0.5] * 3] * 2, [[0.25] * 3] * 2).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32)).float()
    with torch.inference_mode():
        plain = classifier.outputs(x, 2.0)
        rich = classifier.outputs(x, 2.0, features=True)
        pre = nets[1].forward_head(nets[1].forward_features((x - 127.5) / 63.75), pre_logits=True)
    assert plain.features is None and len(rich.features) == 2
    torch.testing.assert_close(rich.probs, plain.probs)
    torch.testing.assert_close(rich.energy, plain.energy)
    torch.testing.assert_close(rich.features[1], torch.nn.functional.normalize(pre, dim=1))
    assert torch.allclose(rich.features[0].norm(dim=1), torch.ones(4))
