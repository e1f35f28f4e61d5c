"""Data: every dataset Pollen trains on, as numpy arrays, and its split between clients.

Modules, in data-flow order (import the one you need; this package re-exports nothing, so
importing it stays light):

* :mod:`pollen.data.dataset`: :class:`~pollen.data.dataset.Dataset` (``uint8`` images
  ``(N, H, W, C)``, ``int64`` labels), and what a data source is
  (:class:`~pollen.data.dataset.Source`, :class:`~pollen.data.dataset.LoadOptions`).
* :mod:`pollen.data.cache`: the cache folder and the ``.npz`` cache of decoded arrays.
* :mod:`pollen.data.decode`: image files and arrays to ``uint8`` arrays;
  :func:`~pollen.data.decode.load_images` for ``pollen predict``.
* :mod:`pollen.data.cifar10`: CIFAR-10 (download, archive, extracted folder).
* :mod:`pollen.data.image_folder`: ``train/<class>/*`` and ``test/<class>/*`` folders.
* :mod:`pollen.data.load`: :func:`~pollen.data.load.load_dataset` picks the source of a
  path from :data:`~pollen.data.load.SOURCES`; :func:`~pollen.data.load.describe`.
* :mod:`pollen.data.partition`: each client's share of a dataset (IID or Dirichlet).

To add a data source, write one module here whose ``SOURCE`` is a
:class:`~pollen.data.dataset.Source` (how a path is recognised, how it is loaded, one phrase
for the help text) and add it to :data:`pollen.data.load.SOURCES`; docs/extending.md walks
through an example.
"""
