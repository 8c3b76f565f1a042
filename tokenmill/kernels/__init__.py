"""Kernels behind the layers' interfaces: fused CPU ops (C++, built on first use)."""
