from .errors import MdistillerError

__all__ = ["MdistillerError"]
