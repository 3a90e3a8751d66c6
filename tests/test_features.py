import torch

from medvlm.data.dataset import VQADataset
from medvlm.features import with_frozen_features


def test_frozen_features_give_the_same_outputs_as_pixels(tiny_model, tiny_splits):
    data = tiny_splits["test"]
    feats = with_frozen_features(tiny_model, data)
    assert feats.pixels.shape == (len(data.pixels), tiny_model.vision.num_patches, tiny_model.vision.width)
    assert with_frozen_features(tiny_model, feats) is feats  # already encoded: no second pass
    a = VQADataset(data, tiny_model.tokenizer, 32)
    b = VQADataset(feats, tiny_model.tokenizer, 32)
    batch_a = [torch.stack(x) for x in zip(*[a[i] for i in range(6)])]
    batch_b = [torch.stack(x) for x in zip(*[b[i] for i in range(6)])]
    tiny_model.eval()
    with torch.no_grad():
        la, _ = tiny_model(*batch_a)
        lb, _ = tiny_model(*batch_b)
    assert torch.allclose(la, lb, atol=1e-5)
