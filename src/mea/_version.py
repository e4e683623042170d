"""mea's version, in a module of its own: the remote-code packager (models layer) reads it without
importing the package root, which imports the models layer."""
__version__ = "0.1.0"
