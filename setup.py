"""Thin setup: metadata lives in pyproject.toml. The optional extension sema._C is added here."""

from setuptools import setup

setup()
