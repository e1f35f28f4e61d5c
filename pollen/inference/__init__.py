"""Use a trained model outside a federation: export it, classify images, evaluate it.

One module per role, none of them imports Flower (a contract in ``pyproject.toml``):

- ``metadata.py``  what travels with a model file: class names, flip-TTA, and how an
  exported file carries them (inside the file itself).
- ``runtimes.py``  open any model file Pollen reads (``model.keras``, a SavedModel folder,
  ``.tflite``, ``.onnx``) as one :class:`~pollen.inference.runtimes.Classifier`.
- ``export.py``    ``model.keras`` -> SavedModel / TFLite / ONNX, with the metadata embedded.
- ``predict.py``   image files and folders -> top classes (and, labelled by folder, a
  confusion matrix).
- ``evaluate.py``  a dataset's test split -> accuracy, per-class precision and recall,
  ``confusion.png``.
- ``metrics.py``   the confusion matrix and the figures derived from it.
"""
