"""Training data: dataset config (``config``), buckets, captions, images, ``TrainDataset`` (``dataset``) and caches (``cache``).

Import from the modules themselves; this package file stays empty so importing one of them stays cheap.
"""
