__version__ = "0.1.0"

#: Version of the on-disk detector format written by :func:`normscore.save`.
FORMAT_VERSION = 1
