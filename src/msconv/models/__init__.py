"""msconv networks. Importing this package registers every model in timm's registry."""
from ._registry import FAMILIES, convert_official, list_models, model_family, register_converter, register_model
from ._builder import MsconvModel, check_image_input, create_model, read_checkpoint
from . import scsc_swin, scsc_resnet, scsc_face  # noqa: E402,F401
