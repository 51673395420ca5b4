"""The experiment runner: one Hydra job = one run of the library on a model and a task.

It imports the library (``lowrank``), never the reverse, and is the only place that knows Hydra,
``datasets`` or W&B. What a reader opens to follow ``python run.py`` to ``result.json``:

    app.py          the Hydra job: config → model, data, ``lowrank.adapt``, ``fit``, result.json
    command.py      run.py's command line: every job of a sweep validated first, exit codes
    schema.py       the config schema (one dataclass per config group)
    config.py       the config's validation (one-line errors before anything loads)
    models.py       loading models: hub name, local folder, packaged weights (MiniLM, SmolLM2 GGUF)
    data.py         tasks: local copies under the data dir or the hub; tokenisation, batching
    train.py        the loop: optimiser, schedule, resume (evaluate.py, checkpoints.py, loss.py beside it)
    rundir.py       the run directory: file names, atomic writes, result.json, run discovery
    results.py      reading runs and sweeps back (notebooks and ``analysis`` use only this)
    tracking.py     metrics.jsonl and W&B
    metrics.py      accuracy, Matthews correlation, corpus BLEU
    distributed.py  torchrun / DDP
    accel.py        speed paths: what each device gets (plan), regional compile, fused chunked loss
    graphs.py       a small model's training micro-batch replayed as one CUDA graph per batch shape
    costs.py        the cost model: predicted memory by component and FLOPs per step
    bundle.py       an offline bundle (wheels, bf16 models, data) for GPU nodes without registry access

Submodules are imported on demand; importing this package loads nothing heavy.
"""

import logging as _logging

# torchao (model.quantize=nf4 on the CPU) is imported by transformers and peft whenever it is installed; on a CPU
# machine it warns that its CUDA extensions and Triton are missing, and it registers enums with torch's pytree,
# which warns once per enum on recent torch: keep logs quiet
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
