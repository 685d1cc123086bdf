"""The parts of the GPU check (``python -m bench.gpu_check``), one concern per module.

- ``plan``: how big each part is in the full, quick and smoke runs;
- ``parity``: greedy tokens and teacher-forced logits against transformers on the same checkpoint;
- ``steps``: decode and prefill step times over a grid, fitted into the simulator's step-cost profile;
- ``breakdown``: the device's limits, the fraction of the HBM roofline, and the profiler's split of a step;
- ``simulations``: run HERE afterwards (it needs the tree's workloads): the routing simulations on a
  measured profile beside the estimate's.

Nothing on the check's path imports Ray, gguf or ``cluster``: a bare GPU machine has only torch,
transformers, safetensors, tokenizers, numpy and the repository.
"""
