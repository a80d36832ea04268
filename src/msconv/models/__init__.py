"""msconv networks. Importing this package registers every model in timm's registry."""

from . import scsc_face, scsc_resnet, scsc_swin, shiftwise_net, smt
from ._builder import (
    MsconvModel,
    check_image_input,
    create_model,
    read_checkpoint,
    read_class_map,
    reparameterize,
    select_classifier_rows,
)
from ._registry import (
    FAMILIES,
    convert_official,
    list_models,
    model_family,
    model_info,
    register_converter,
    register_model,
)

__all__ = [
    'FAMILIES',
    'convert_official',
    'list_models',
    'model_family',
    'model_info',
    'register_converter',
    'register_model',
    'MsconvModel',
    'check_image_input',
    'create_model',
    'read_checkpoint',
    'read_class_map',
    'reparameterize',
    'select_classifier_rows',
    'scsc_face',
    'scsc_resnet',
    'scsc_swin',
    'shiftwise_net',
    'smt',
]
