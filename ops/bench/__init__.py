"""The benchmarks behind ``trackstream bench``, one module per measurement.

- :mod:`ops.bench.pipeline`: the real stages as worker processes, end to end (``--pipeline``);
  :mod:`ops.bench.worker` is the worker process it starts.
- :mod:`ops.bench.growth`: the pipeline as the history grows (``--growth``).
- :mod:`ops.bench.views`: a view refresh as the history grows (``--views``).
- :mod:`ops.bench.geofence_stage`: the geofence stage alone, without Redis.
- :mod:`ops.bench.notify`: the notify stage's deliveries (``trackstream webhooks bench``).

The runtime's own benchmark (the 4-stage pass-through against a raw redis-py loop) is
:mod:`streams.bench`, next to the code it measures.
"""
