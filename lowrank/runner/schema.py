"""The structured schema of the experiment configuration: one dataclass per Hydra config group.

``conf/`` composes a config; ``lowrank.runner.config.validate`` merges it onto ``Config`` (types, unknown
keys) and then checks values against what exists. The defaults here are the schema's; the documented
defaults a run uses live in ``conf/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: str = MISSING          # hub name, local folder, or pkg://<package>/<folder>
    gguf_file: Optional[str] = None    # a GGUF file inside `pretrained` (dequantised on load)
    dtype: str = "auto"                # auto: bf16 on CUDA under bf16 autocast, float32 otherwise
    quantize: str = "none"             # frozen base stored as nf4 (QLoRA) / int8 / none: lowrank.quantize
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # image backbones (lowrank/runner/convnets.py): set `arch` for a ConvNet instead of a transformers model
    arch: Optional[str] = None
    padding: str = "symmetric"         # symmetric (k-1)/2, or TensorFlow's "same"
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class LocalFiles:
    format: str = "label_text"
    encoding: str = "utf-8"
    train: Optional[str] = None        # paths relative to paths.data_dir
    eval: Optional[str] = None
    test: Optional[str] = None
    all: Optional[str] = None          # one unsplit file, split by `split`


@dataclass
class SplitConfig:
    eval_fraction: float = 0.1
    seed: int = 1234


@dataclass
class HubSource:
    path: str = MISSING
    name: Optional[str] = None
    text: str = "text"
    label: str = "label"
    train: str = "train"
    eval: str = "validation"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@dataclass
class ImageTaskConfig:
    source: str = "folder"             # digits | folder | hub (lowrank/runner/images.py)
    size: int = 224                    # images are resized (shorter side) and centre-cropped to size x size
    folder: Optional[str] = None       # relative to paths.data_dir
    labels: List[str] = field(default_factory=list)   # class folder names in label order; [] = sorted folders
    column: str = "image"              # the image column of a hub dataset
    augment: bool = False              # random horizontal flips in training


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: str = "classification"
    num_labels: int = 2
    metric: str = "accuracy"
    local: LocalFiles = field(default_factory=LocalFiles)
    split: Optional[SplitConfig] = None
    hub: Optional[HubSource] = None
    prompt: str = "{mr}\n"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    image: Optional[ImageTaskConfig] = None   # an image classification task (lowrank/runner/images.py)


@dataclass
class AdapterConfig:
    name: str = MISSING
    source: str = ""
    init: Optional[str] = None   # LoRA/DoRA: default|pissa|milora|olora, read as options.init (conf/adapter/lora.yaml)
    allocate: Optional[str] = None   # DoRA: adalora (this project's adaptive DoRA), read as options.allocate
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 250
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.06
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    max_seq_len: int = 64
    group_by_length: bool = True
    eval_every: int = 125
    eval_batch_size: int = 128
    max_eval_samples: Optional[int] = None
    log_every: int = 10
    checkpoint_every: int = 125
    save_weights_at: List[int] = field(default_factory=list)
    save_weights_every: int = 0
    save_weights_at_fractions: List[float] = field(default_factory=list)
    decay_magnitude: bool = False
    lora_plus_ratio: Optional[float] = None   # LoRA+ (arXiv 2402.12354): lora_B's lr = ratio × lr (runner/loraplus.py)
    head_first_steps: int = 0
    head_first_lr: float = 1e-3
    precision: str = "auto"
    compile: str = "auto"
    fused_loss: str = "auto"
    length_buckets: Optional[int] = None
    packing: bool = False
    device: str = "auto"
    num_threads: Optional[int] = None
    progress: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "lowrank"
    entity: Optional[str] = None
    mode: str = "offline"
    log_adapter_artifact: bool = True
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: Optional[str] = None     # None: DEFAULT_DATA_DIR
    output_dir: str = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    rank: int = 8
    alpha: Optional[float] = 8.0
    targets: List[str] = field(default_factory=lambda: ["q", "v"])
    layers: Optional[List[int]] = None
    seed: int = 0
    name: str = "default"
