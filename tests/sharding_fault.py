"""`adapterkit train` in which process 1 raises at a chosen training forward (for tests/test_sharding.py).

Launched like the CLI (`torchrun ... tests/sharding_fault.py train ...`); ADAPTERKIT_TEST_FAIL_AFTER is the
number of micro-batches process 1 runs before it raises, as a crash on one machine (out of memory,
a bad disk) would; it writes the time it raised to ADAPTERKIT_TEST_FAIL_STAMP.
"""

import os
import sys
import time
from pathlib import Path

import adapterkit.training.loop as loop
from adapterkit.cli import main

_real = loop.labelled_loss
_calls = {"n": 0}


def _failing(model, batch):
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] > int(os.environ["ADAPTERKIT_TEST_FAIL_AFTER"]):
        Path(os.environ["ADAPTERKIT_TEST_FAIL_STAMP"]).write_text(str(time.time()))  # when it failed
        raise RuntimeError("injected failure on process 1")
    return _real(model, batch)


loop.labelled_loss = _failing
sys.exit(main(sys.argv[1:]))
