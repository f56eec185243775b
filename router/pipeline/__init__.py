"""The request pipeline: what every surface calls (core.py), and nothing of HTTP.

Also named here are the records it hands to surfaces (keys, tasks, artifacts), so that a surface
renders them without reaching into the state or artifact stores itself.
"""

from ..artifacts import Artifact
from ..state import KeyRecord, TaskRecord
from .asks import ImageAsk, Inputs
from .caller import Caller
from .core import Pipeline
from .delivery import ClientGone, Gone
from .idempotency import Reply, fingerprint
from .inputs import MAX_INPUT_IMAGES, ImageRefs
from .json_parts import Base64Text, json_bytes
from .normalize import DeliveredImage
from .pricing import MICRO, Price
from .progress import Interrupted, RunningJob
from .results import Generation, image_item, images_body
from .settlement import Admitted
from .validation import Prepared

__all__ = ["MAX_INPUT_IMAGES", "MICRO", "Admitted", "Artifact", "Base64Text", "Caller", "ClientGone",
           "DeliveredImage", "Generation", "Gone", "ImageAsk", "ImageRefs", "Inputs", "Interrupted", "KeyRecord",
           "Pipeline", "Prepared", "Price", "Reply", "RunningJob", "TaskRecord", "fingerprint", "image_item",
           "images_body", "json_bytes"]
