"""Benchmarks that anyone can rerun; the numbers quoted in the docs come from here. Each module has a request
(a frozen dataclass), a ``run_*`` function that returns rows and a function that formats them; ``znn bench``
(:mod:`znn.cli.bench`) parses the options.

* :mod:`znn.bench.ops` -- one conv layer forward + backward, direct vs FFT vs PyTorch (``znn bench ops``);
* :mod:`znn.bench.net` -- a whole network's forward pass and training step (``znn bench net``);
* :mod:`znn.bench.forward` -- dense-inference throughput and peak memory beside PyTorch and ONNX Runtime, each
  engine in a fresh process per patch (:mod:`znn.bench.engines`), with the largest patch each fits
  (:mod:`znn.bench.growth`) (``znn bench forward``);
* :mod:`znn.bench.scaling` -- dense inference on 1, 2, ... dask workers (``znn bench scaling``);
* :mod:`znn.bench.common`, :mod:`znn.bench.networks`, :mod:`znn.bench.torchnet`, :mod:`znn.bench.onnxnet` --
  tables and JSON, the bundled networks by name, the same network in PyTorch and exported to ONNX Runtime.
"""

__all__: list[str] = []
