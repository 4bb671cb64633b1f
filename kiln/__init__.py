"""Kiln: ahead-of-time compilation and artifact store for AWS Neuron."""

__version__ = "0.1.0"
