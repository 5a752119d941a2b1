"""Core: the math and data model every stage shares, free of data loading and files.

``factorize`` (closed forms, tensor math only), ``allocate`` (ranks from spectra), ``plan`` (the
plan's data model), ``targets`` (which linears), ``modules`` (the eager LoRD layers), ``apply``
(module swap) and ``fingerprint`` (which dense model a plan belongs to).
"""
