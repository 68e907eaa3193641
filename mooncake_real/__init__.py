"""Real mode: the protocol run in real OS processes with real sockets, shared memory and CUDA kernels.

Rules of this package (see docs/real-mode.md):

* It may import :mod:`mooncake_protocol`, the standard library, ``zmq`` and ``numpy``; ``zmq``, ``numpy``
  and ``cupy`` are imported lazily inside functions, so ``import mooncake_real`` works without them.
* It never imports ``mooncake_sim`` or ``simpy``.
* One rank = one OS process (:func:`mooncake_real.driver.run_rank`), started by
  :func:`mooncake_real.launcher.launch`, which also owns hygiene: every process it started is gone and
  every shared-memory segment of the job is unlinked when it returns, whatever happened.
"""
