"""The interpreter lock's switch interval, for engine threads that share it with request threads.

An engine thread (llama.cpp's batch engine, the hf scheduler, the hf process's reader) releases
the GIL inside each native call and must take it back as soon as the call returns. With
CPython's default 5 ms switch interval a request thread busy with HTTP, sampling or streaming
keeps it up to that long, and the model idles meanwhile.

Measured:
- hf backend, H200, 32 sessions over HTTP: 5 ms gave 2,485 tok/s, 0.5 ms 2,748, and 0.1 ms
  1,196 (the lock then ping-pongs among request threads).
- daemon on 2 cores, SmolLM2-135M, 8 clients (`bench/bench_serving.py --skip deferral ttft
  gateway audit exact`, runs alternated on one machine): 5 ms gave 99.6, 101.3 and 74.6 tok/s
  (in the last run llama-server fell too, to 115 from 155-179); 0.5 ms 111.5, 111.5, 101.3 and
  104.8; 1 ms 110.5. One client: 89.6, 99.3, 86.9 vs 100.7, 100.5, 93.8, 100.7. The daemon's
  runs are noisy by about 10%; the gain is about that size.

The setting is process-wide: a daemon or a gateway process serves its one model.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def favour_engine_threads() -> None:
    """Shorten the switch interval to ``SWITCH_INTERVAL_S``; never lengthen a shorter one."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
