"""kvcompress: KV-cache compression strategies behind one cache interface, on one decode engine."""
__version__ = "0.1.0"
