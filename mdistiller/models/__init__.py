"""The model zoos: `cifar_model_dict` / `imagenet_model_dict` / `tiny_imagenet_model_dict`, each
`name -> (builder, teacher path or None)`."""

from .cifar import cifar_model_dict
from .imagenet import imagenet_model_dict
from .tiny_imagenet import tiny_imagenet_model_dict

__all__ = ["cifar_model_dict", "imagenet_model_dict", "tiny_imagenet_model_dict"]
