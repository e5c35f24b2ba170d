"""The model zoo: `cifar_model_dict[name] -> (builder, teacher checkpoint path or None)`."""

from .cifar import cifar_model_dict

imagenet_model_dict: dict = {}

__all__ = ["cifar_model_dict", "imagenet_model_dict"]
