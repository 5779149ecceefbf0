"""Foundations every other package stands on: the pinned CPU kernels, the cache and file rules,
provenance.

Modules, each importing only those above it here (and packages listed before this one in qg):
  kernels  the CPU kernels torch computes with, pinned before torch loads (floats independent of
           the machine)
  io       the cache rule, atomic writes, checked safetensors reads, content hashes; ROOT
  audit    a cache checked without changing it: damaged, unverified and orphaned artifacts
  report   tidy tables, provenance (commit, inputs, kernels), deterministic figures
"""
