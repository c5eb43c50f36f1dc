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


def test_outputs_gathered_in_chunks_are_the_batches_outputs_in_order():
    import timm

    from noisy_student.core.settings import PARAMS_FILE, load_settings
    from noisy_student.models.classifier import Classifier
    from noisy_student.models.inference import eval_loader, iter_outputs

    torch.manual_seed(0)
    nets = [timm.create_model("resnet10t", num_classes=3) for _ in range(2)]
    classifier = Classifier(nets, [[0.5] * 3] * 2, [[0.25] * 3] * 2)
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8).numpy()
    runtime, cpu = load_settings(PARAMS_FILE).runtime, torch.device("cpu")  # no workers
    loader = eval_loader(images, 4, runtime, cpu)  # batches of 4, 4, 2
    each = list(iter_outputs(classifier, loader, cpu, runtime, features=True))
    gathered = list(iter_outputs(classifier, loader, cpu, runtime, features=True, rows=5))
    assert [len(o.probs) for o in each] == [4, 4, 2]
    assert [len(o.probs) for o in gathered] == [8, 2]  # whole batches until 5 rows are held
    for field in ("probs", "energy"):
        torch.testing.assert_close(
            torch.cat([getattr(o, field) for o in gathered]),
            torch.cat([getattr(o, field) for o in each]),
            rtol=0,
            atol=0,
        )
    for member in range(2):
        torch.testing.assert_close(
            torch.cat([o.features[member] for o in gathered]),
            torch.cat([o.features[member] for o in each]),
            rtol=0,
            atol=0,
        )
