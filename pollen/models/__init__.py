"""Models: the registry and every architecture in it.

Importing any module of this package runs this file first, so every
architecture below has registered itself in ``pollen.models.registry.MODELS``
before a caller sees it. One import line per architecture module; their
order is the order of ``MODELS``. Adding a model is one new module here and
its line below (docs/extending.md).
Builders import Keras only when they build, so listing models stays light.
"""

# Registration order is this import order: keep it, do not sort.
# isort: off
from pollen.models import mobilenetv2 as mobilenetv2
from pollen.models import fastnet as fastnet
from pollen.models import cnn as cnn
from pollen.models import efficientnet as efficientnet
from pollen.models import scatternet as scatternet
# isort: on
