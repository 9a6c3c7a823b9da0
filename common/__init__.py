"""Leaf package shared by every layer: user errors, device choice, distributed helpers.

It imports nothing from the project, so models/, data/, losses/ and engine/ may all import it.
"""
