"""Model registry and the models registered in it.

Each model module registers itself on import; add a new module to the imports below.
The torchvision repair runs first: smp and timm import torchvision at import time.
"""

from aerialseg.models.torchvision_fix import patch_torchvision_ops

patch_torchvision_ops()

from aerialseg.models.registry import (  # noqa: E402, F401
    ModelSpec,
    count_parameters,
    create_model,
    get_spec,
    list_models,
    load_model,
    load_state,
    pad_to_multiple,
    register_model,
    save_model,
)

# Model modules (each registers its models on import):
from aerialseg.models import zoo  # noqa: F401
from aerialseg.models import dasnet  # noqa: F401
from aerialseg.models import lwirstnet  # noqa: F401
from aerialseg.models import dinov2_unet  # noqa: F401
