"""The fast paths of the spec's math, one file per family, each a table name -> function with one signature,
tested against the reference by one parametrised test (tests/unit/test_kernels.py)."""
