"""One typed configuration tree for everything in medvlm.

YAML presets in ``configs/`` and ``key=value`` overrides are merged onto these dataclasses
in :func:`load_config`; nothing past that function sees an OmegaConf ``DictConfig``.
Each dataclass validates itself in ``__post_init__`` with a message naming the bad field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"config: {key}={value!r} is invalid: {fix}")


@dataclass
class VisionConfig:
    # Where the frozen open_clip vision tower comes from (one loading path for all):
    #   "builtin:tiny"        the project's tiny ViT, pretrained on its synthetic public corpus
    #                         (built once by `medvlm-fl build-foundation`, then cached)
    #   "builtin:tiny-random" the same architecture with random weights (for ablations/tests)
    #   "local-dir:/models/BiomedCLIP"  an open_clip directory (open_clip_config.json + weights)
    #   "hf-hub:org/name"     an open_clip model on the Hugging Face hub (needs network)
    source: str = "builtin:tiny"
    # Local directory to use for the HF text tower that some open_clip configs reference
    # (BiomedCLIP's PubMedBERT). Only the vision tower is used, so it may stay unset.
    hf_text_dir: Optional[str] = None

    def __post_init__(self) -> None:
        ok = self.source.startswith(("builtin:", "local-dir:", "hf-hub:"))
        _check(ok, "model.vision.source", self.source,
               "use builtin:tiny, builtin:tiny-random, local-dir:/path or hf-hub:org/name")


@dataclass
class FusionConfig:
    # "qformer": learned queries cross-attending the patch tokens (BLIP-2 / seed design)
    # "mlp":     LLaVA-style projector applied to every patch token
    kind: str = "qformer"
    num_queries: int = 8      # visual soft tokens handed to the LLM (qformer)
    dim: int = 64             # internal width of the query transformer
    layers: int = 1
    heads: int = 4
    mlp_ratio: int = 2
    # Initial fusion weights: "random" or a path to a fusion.safetensors file (see model.init
    # for starting the whole trainable state from public-data training or an earlier run).
    init: str = "random"

    def __post_init__(self) -> None:
        _check(self.kind in ("qformer", "mlp"), "model.fusion.kind", self.kind, "use qformer or mlp")
        for name in ("num_queries", "dim", "layers", "heads", "mlp_ratio"):
            _check(getattr(self, name) > 0, f"model.fusion.{name}", getattr(self, name), "must be > 0")
        _check(self.dim % self.heads == 0, "model.fusion.dim", self.dim,
               f"must be divisible by model.fusion.heads={self.heads}")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # FFA-LoRA (arXiv 2403.12313): every A matrix stays frozen at its shared initialisation and only
    # B is trained and sent. Averaging B is then exactly averaging the products BA, the update and
    # the DP noise dimension halve. A comes from model.init (the same on every site).
    ffa: bool = False

    def __post_init__(self) -> None:
        _check(self.r > 0, "model.lora.r", self.r, "rank must be > 0")
        _check(self.alpha > 0, "model.lora.alpha", self.alpha, "must be > 0 (LoRA scales its update by alpha / r: "
               "0 trains nothing)")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "model.lora.target_modules", self.target_modules,
               "name at least one module, e.g. [q_proj, v_proj] (Llama) or [query_key_value] (BLOOM)")


@dataclass
class LanguageConfig:
    # "builtin:tiny" (Llama-shaped, pretrained on the synthetic public corpus by
    # `medvlm-fl build-foundation`), "builtin:tiny-random", a local directory with a Hugging
    # Face causal LM + tokenizer (the hospital path for a 7B LLM), or a hub id when online.
    source: str = "builtin:tiny"
    dtype: str = "float32"    # dtype of the frozen base weights: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.language.dtype", self.dtype,
               "use float32, bfloat16 or float16")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_text_len: int = 32    # prompt + answer tokens, padded to this fixed length
    # Initial trainable state (fusion + LoRA): "random"; "public" (the seed paper's stages 1-2 in
    # miniature: VQA on images of the built-in *public* corpus, no hospital data, built once and
    # cached; needs the builtin:tiny models); or an exported adapter folder (a run's global/).
    init: str = "random"

    def __post_init__(self) -> None:
        _check(self.max_text_len >= 8, "model.max_text_len", self.max_text_len, "must be >= 8")
        _check(self.init == "random" or self.fusion.init == "random", "model.init", self.init,
               f"model.fusion.init={self.fusion.init!r} is set too: choose one of them")


DATA_FORMATS = ("auto", "jsonl", "vqa-rad", "slake", "pmc-vqa", "mimic-cxr", "r2gen", "parquet", "vqa-med")
TASKS = ("vqa", "report")
# synthetic: who holds which images. own: each hospital its own profile's images (non-IID, the default);
# iid: the same images, each split pooled across data.hospitals and dealt out at random in the same shares
# (a research control: what the non-IID split costs a federation; medvlm.data.dataset.load_splits)
PARTITIONS = ("own", "iid")
# A curriculum stage may also be ``tags``: stage 1 at the hospitals (medvlm.tags), the fusion learns
# each image's answers as tags through a head that stays at the hospital; it reads the VQA rows.
STAGE_TASKS = (*TASKS, "tags")
# a tags stage's loss (medvlm.tags): bce (every answer a sigmoid of its own over the hashed columns) |
# yes-no (each yes/no answer a two-way choice between its two columns; other answers unused)
TAG_LOSSES = ("bce", "yes-no")
TAG_HEADS = ("local", "fixed")    # a tags stage's head: trained at each hospital | fixed (FedBABU)


@dataclass
class DicomConfig:
    """How a DICOM image becomes the 8-bit picture the encoder's preprocessing expects."""
    # Window (VOI) to display: both None = the file's own WindowCenter/WindowWidth (or VOI LUT),
    # and the image's full range when it has neither. Set both to force one window for all files
    # (e.g. 40 / 400 for CT soft tissue). Applied after RescaleSlope/Intercept (Hounsfield units).
    window_center: Optional[float] = None
    window_width: Optional[float] = None
    # Without a forced window: "file" = the file's own window; "percentile" = the stored values'
    # percentiles (robust: a CR's full-range window leaves little contrast); "auto" (default) = the
    # file's window unless it spans >= 90% of what the pixels can store, then the percentiles (a file
    # with no window at all: its full range, as before)
    # (measured on pydicom-data's RG1_UNCI.dcm, a 15-bit CR whose window is 15000/30000: the grey
    # values' standard deviation goes from 38.8 to 53.4, the darkest percentile from 61 to 9).
    window: str = "auto"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # Multi-frame files: which frame to use: "first", "middle", "last" or a 0-based index ("12")
    frame: str = "middle"

    def __post_init__(self) -> None:
        _check((self.window_center is None) == (self.window_width is None), "data.dicom.window_center/width",
               (self.window_center, self.window_width), "set both (a window) or neither (the file's own)")
        _check(self.window in ("auto", "file", "percentile"), "data.dicom.window", self.window,
               "use auto, file or percentile")
        _check(len(self.percentiles) == 2 and 0 <= self.percentiles[0] < self.percentiles[1] <= 100,
               "data.dicom.percentiles", self.percentiles, "two percentiles, low < high, within [0, 100]")
        _check(self.window_width is None or self.window_width > 0, "data.dicom.window_width", self.window_width,
               "must be > 0")
        _check(self.frame in ("first", "middle", "last") or self.frame.isdigit(), "data.dicom.frame", self.frame,
               "use first, middle, last or a 0-based frame index")


@dataclass
class DataConfig:
    # "synthetic": the built-in generator; otherwise a data folder or file in one of the formats
    # below (a manifest.jsonl, a VQA-RAD / SLAKE / PMC-VQA / R2Gen / MIMIC-CXR-style folder, parquet files)
    source: str = "synthetic"
    # auto (recognised from the folder's files) | jsonl | vqa-rad | slake | pmc-vqa | mimic-cxr
    format: str = "auto"
    language: str = "en"             # SLAKE rows in other languages (q_lang) are left out
    dicom: DicomConfig = field(default_factory=DicomConfig)
    # Frozen-feature cache folder for train-local / evaluate (hospitals use <state-dir>/features);
    # None = encode in memory only
    feature_cache: Optional[str] = None
    # synthetic: which hospital profiles to pool (names from medvlm.data.synthetic.PROFILES, or
    # <profile>-<k> for the k-th site like a profile: many-hospital simulations)
    hospitals: list[str] = field(default_factory=lambda: ["general", "oncology", "cardiac"])
    images_per_hospital: int = 400   # each image carries several questions
    # synthetic: hospitals also hold findings the public corpus lacks (pneumothorax, pacemaker) and
    # are asked about them (question types in medvlm.data.synthetic.HOSPITAL_ONLY_QTYPES)
    hospital_only: bool = False
    # synthetic: own (each hospital its profile's images) | iid (the same images dealt out at random; PARTITIONS)
    partition: str = "own"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    # dataset: keep a release's published train / validate / test split (validation drawn from the
    # training images, val_fraction of them, when a release publishes none); redraw: split by image
    # with val_fraction / test_fraction. Rows without a split (the synthetic data) are always redrawn.
    split_source: str = "dataset"
    # what to do with a bad manifest row: "error" (default, lists every bad row) or "skip"
    on_bad_row: str = "error"
    # vqa: answer questions; report: write the findings report of an image (report rows, or the
    # report a question row carries; MIMIC-CXR-style folders have reports only)
    task: str = "vqa"
    qtypes: list[str] = field(default_factory=list)   # vqa: train/evaluate only these question types
    # report: the finding labeler behind finding-F1: "synthetic" (rule-based, for the built-in
    # findings) or "package.module:function" (text -> set of finding labels; e.g. a CheXbert wrapper)
    labeler: str = "synthetic"

    def __post_init__(self) -> None:
        _check(self.images_per_hospital > 0, "data.images_per_hospital", self.images_per_hospital, "must be > 0")
        _check(self.seed >= 0, "data.seed", self.seed, "must be >= 0 (numpy's seed sequences take no negative seed: "
               "every hospital crashed)")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        _check(0 <= self.test_fraction < 1, "data.test_fraction", self.test_fraction, "must be in [0, 1)")
        _check(self.val_fraction + self.test_fraction < 1, "data.val_fraction+data.test_fraction",
               self.val_fraction + self.test_fraction, "must leave some training data (< 1)")
        _check(self.on_bad_row in ("error", "skip"), "data.on_bad_row", self.on_bad_row, "use error or skip")
        _check(self.split_source in ("dataset", "redraw"), "data.split_source", self.split_source,
               "use dataset or redraw")
        _check(self.format in DATA_FORMATS, "data.format", self.format, f"use one of {list(DATA_FORMATS)}")
        _check(self.task in TASKS, "data.task", self.task, f"use one of {list(TASKS)}")
        _check(self.partition in PARTITIONS, "data.partition", self.partition, f"use one of {list(PARTITIONS)}")
        _check(self.partition == "own" or self.source == "synthetic", "data.partition", self.partition,
               f"iid deals out the synthetic hospitals' images; data.source={self.source!r} is a site's own "
               "data, not dealt out: use data.partition=own")
        _check(self.labeler == "synthetic" or ":" in self.labeler, "data.labeler", self.labeler,
               "use synthetic or package.module:function")


@dataclass
class PrivacyConfig:
    enabled: bool = True
    # Give either a target epsilon (noise is calibrated for the planned steps) or a noise
    # multiplier (epsilon follows from the steps taken). target_epsilon wins if both are set.
    target_epsilon: Optional[float] = 8.0
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"          # rdp | prv | gdp (Opacus accountants)
    grad_sample_mode: str = "hooks"  # hooks | functorch | ew | ghost (Opacus)

    def __post_init__(self) -> None:
        if self.enabled:
            _check(self.target_epsilon is not None or self.noise_multiplier is not None,
                   "privacy.target_epsilon", self.target_epsilon,
                   "set privacy.target_epsilon or privacy.noise_multiplier (or privacy.enabled=false)")
        if self.target_epsilon is not None:
            _check(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon, "must be > 0")
        if self.noise_multiplier is not None:
            _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, "must be >= 0")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1), e.g. 1e-5")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "must be > 0")
        _check(self.accountant in ("rdp", "prv", "gdp"), "privacy.accountant", self.accountant, "use rdp, prv or gdp")
        _check(self.grad_sample_mode in ("hooks", "functorch", "ew", "ghost"), "privacy.grad_sample_mode",
               self.grad_sample_mode, "use hooks, functorch, ew or ghost")


@dataclass
class TrainConfig:
    epochs: float = 10.0             # local epochs (fractions allowed: steps = epochs / sample_rate)
    batch_size: int = 64             # expected logical batch size (Poisson sampling under DP)
    physical_batch_size: int = 64    # memory cap per forward pass (Opacus BatchMemoryManager)
    lr: float = 1e-3
    optimizer: str = "adamw"         # adamw | sgd
    momentum: float = 0.0            # sgd only
    trainable: list[str] = field(default_factory=lambda: ["fusion", "lora"])  # which parts train
    weight_decay: float = 0.0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_max_new_tokens: int = 12

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _check(self.batch_size > 0, "train.batch_size", self.batch_size, "must be > 0")
        _check(self.physical_batch_size > 0, "train.physical_batch_size", self.physical_batch_size, "must be > 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(self.optimizer in ("adamw", "sgd"), "train.optimizer", self.optimizer, "use adamw or sgd")
        _check(0.0 <= self.momentum < 1.0, "train.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.eval_max_new_tokens >= 1, "train.eval_max_new_tokens", self.eval_max_new_tokens,
               "must be >= 1 (with none every answer is empty)")
        _check(bool(self.trainable) and set(self.trainable) <= {"fusion", "lora"}, "train.trainable",
               self.trainable, "name a non-empty subset of [fusion, lora]")


@dataclass
class CentralDPConfig:
    """Client-level DP at the coordinator, a layer on top of each hospital's DP-SGD (Flower's
    server-side fixed clipping): every hospital's change to the global state is clipped to
    ``clipping_norm`` (L2), the updates are averaged with equal weights, and the average gets
    Gaussian noise of std ``noise_multiplier * clipping_norm / hospitals averaged``. With a handful
    of hospitals the client-level epsilon is large: the guarantee that matters stays DP-SGD's."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.1
    delta: float = 1.0e-5            # client-level delta for the reported epsilon

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, "federation.central_dp.noise_multiplier", self.noise_multiplier,
               "must be >= 0")
        _check(self.clipping_norm > 0, "federation.central_dp.clipping_norm", self.clipping_norm, "must be > 0")
        _check(0 < self.delta < 1, "federation.central_dp.delta", self.delta, "must be in (0, 1)")


@dataclass
class StageConfig:
    """One stage of a federated curriculum (the seed paper's schedule: align -> general VQA -> domain
    VQA). Each stage trains for ``rounds`` on its own task and question types with its own
    trainable parts and learning rate; the global state carries over to the next stage."""

    name: str = "stage"
    rounds: int = 1
    task: str = "vqa"                 # vqa | report (image -> findings report: image-text alignment) | tags
    qtypes: list[str] = field(default_factory=list)   # vqa: question types of this stage (empty: all)
    trainable: list[str] = field(default_factory=lambda: ["fusion", "lora"])
    lr: Optional[float] = None        # default: federation.lr, then train.lr
    local_epochs: Optional[float] = None  # default: federation.local_epochs
    # share of each hospital's budget this stage spends (default: the stages without one share what is
    # left in proportion to their rounds); the hospital's own budget still caps the whole run
    budget: Optional[float] = None
    tag_loss: str = "bce"             # a tags stage's loss: bce | yes-no (TAG_LOSSES)
    # a tags stage's head: local (trained at each hospital, kept there) | fixed (the same seeded random
    # head everywhere, never trained: every hospital's fusion learns towards one head; FedBABU)
    tag_head: str = "local"

    def __post_init__(self) -> None:
        key = f"federation.stages[{self.name}]"
        _check(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(), f"{key}.name", self.name,
               "use letters, digits, - and _")
        _check(self.rounds >= 1, f"{key}.rounds", self.rounds, "must be >= 1")
        _check(self.task in STAGE_TASKS, f"{key}.task", self.task, f"use one of {list(STAGE_TASKS)}")
        _check(bool(self.trainable) and set(self.trainable) <= {"fusion", "lora"}, f"{key}.trainable",
               self.trainable, "name a non-empty subset of [fusion, lora]")
        _check(self.task != "tags" or list(self.trainable) == ["fusion"], f"{key}.trainable", self.trainable,
               "a tags stage trains the fusion alone (its head reads the fusion's output): use [fusion]")
        _check(self.tag_loss in TAG_LOSSES, f"{key}.tag_loss", self.tag_loss, f"use one of {list(TAG_LOSSES)}")
        _check(self.task == "tags" or self.tag_loss == "bce", f"{key}.tag_loss", self.tag_loss,
               f"a {self.task} stage has no tag head: tag_loss applies to a tags stage only")
        _check(self.tag_head in TAG_HEADS, f"{key}.tag_head", self.tag_head, f"use one of {list(TAG_HEADS)}")
        _check(self.task == "tags" or self.tag_head == "local", f"{key}.tag_head", self.tag_head,
               f"a {self.task} stage has no tag head: tag_head applies to a tags stage only")
        _check(self.lr is None or self.lr > 0, f"{key}.lr", self.lr, "must be > 0")
        _check(self.local_epochs is None or self.local_epochs > 0, f"{key}.local_epochs", self.local_epochs,
               "must be > 0")
        _check(self.budget is None or 0 < self.budget < 1, f"{key}.budget", self.budget,
               "a share of each hospital's budget: 0 < budget < 1 (leave it out to share by rounds)")


SECURE_AGGREGATION = ("none", "secagg+")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "fedavgm", "fedadam", "fedyogi")
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")   # step from the global state along the mean update
TRANSPORTS = ("fp32", "bf16", "int8")
LR_SCHEDULES = ("round", "stage")


@dataclass
class FederationConfig:
    """The coordinator's round plan. Each sampled hospital runs ``local_epochs`` of DP-SGD per round."""

    rounds: int = 5
    local_epochs: float = 2.0        # per round; a hospital's DP plan covers rounds * local_epochs
    lr: Optional[float] = None       # local learning rate in rounds (default: train.lr)
    # The learning rate's warm-up + cosine: round (each round's local training runs the whole curve,
    # from warm-up to 0) | stage (one curve over each stage's rounds: a round carries on where the
    # last stopped, so the global model's steps follow one schedule, as pooled training's do)
    lr_schedule: str = "round"
    fraction_train: float = 1.0      # share of connected hospitals sampled per round
    fraction_evaluate: float = 1.0
    min_nodes: int = 1               # a round starts once this many hospitals are connected; it goes on with fewer replies
    node_wait_s: float = 600.0       # ... waiting at most this long for them, then the run stops saying who is missing
    timeout_s: float = 600.0         # a hospital that has not replied by then is left out of the round
    max_update_mb: float = 64.0      # a reply larger than this is rejected unread
    seed: int = 0                    # initial global state
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    secure_aggregation: str = "none"  # none | secagg+ (the coordinator sees only the mean update)
    secagg_clipping_range: float = 1.0  # SecAgg+ fixed-point range for each element of an update
    # fedavg (weighted by examples) | median (coordinate-wise) | trimmed-mean (coordinate-wise,
    # trim_fraction cut from each tail: needs >= 1 / trim_fraction hospitals per round to cut any)
    # | fedavgm | fedadam | fedyogi: Flower's server optimizers (Hsu et al. 2019; Reddi et al. 2021):
    # the weighted mean update is a pseudo-gradient the coordinator steps along, with momentum
    # (server_momentum: FedAvgM's momentum, Adam's and Yogi's beta_1) and, for Adam and Yogi, a
    # per-coordinate step of about server_lr (which they need set: the size of a round's update, e.g.
    # 1e-3). FedAvgM's server_lr defaults to 1 (with momentum 0 it is FedAvg). server_tau is Adam's and
    # Yogi's tau, the floor added to the root of the second moment (None: Flower's 1e-3): an update
    # coordinate much smaller than tau moves by less than server_lr. The optimizer's state is
    # checkpointed with every round, so a resumed run carries on with it.
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    server_lr: Optional[float] = None
    server_momentum: float = 0.9
    server_tau: Optional[float] = None
    # How the trainable state travels: fp32 (exact) | bf16 (half the bytes) | int8 (a quarter);
    # compact transports send each hospital's change, decoded into float32 for aggregation
    transport: str = "fp32"
    # A curriculum: stages run in order and federation.rounds becomes the sum of their rounds. Empty:
    # one stage of federation.rounds on data.task / data.qtypes with train.trainable. Each hospital
    # spends its budget across the stages in proportion to their rounds (or by a stage's ``budget`` share).
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stages:
            names = [s.name for s in self.stages]
            _check(len(set(names)) == len(names), "federation.stages", names, "stage names must be unique")
            self.rounds = sum(s.rounds for s in self.stages)
            shares = [s.budget for s in self.stages if s.budget is not None]
            every = len(shares) == len(self.stages)
            _check(math.isclose(sum(shares), 1.0) if every else sum(shares) < 1,
                   "federation.stages[*].budget", shares, "the stages' budget shares must leave some budget to the "
                   "stages without one (and add up to 1 when every stage has one)")
        _check(self.aggregation in AGGREGATIONS, "federation.aggregation", self.aggregation,
               f"must be one of {AGGREGATIONS}")
        _check(0 <= self.trim_fraction < 0.5, "federation.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        _check(self.server_lr is None or self.server_lr > 0, "federation.server_lr", self.server_lr, "must be > 0")
        _check(self.server_lr is not None or self.aggregation not in ("fedadam", "fedyogi"), "federation.server_lr",
               self.server_lr, f"{self.aggregation} moves every coordinate by about server_lr per round: set it "
               "to the size of a round's update (e.g. federation.server_lr=1e-3)")
        _check(0 <= self.server_momentum < 1, "federation.server_momentum", self.server_momentum, "must be in [0, 1)")
        _check(self.server_tau is None or self.server_tau > 0, "federation.server_tau", self.server_tau, "must be > 0")
        _check(self.server_tau is None or self.aggregation in ("fedadam", "fedyogi"), "federation.server_tau",
               self.server_tau, f"is Adam's and Yogi's floor under the second moment; {self.aggregation} has none: "
               "leave it unset or use federation.aggregation=fedadam or fedyogi")
        _check(self.lr_schedule in LR_SCHEDULES, "federation.lr_schedule", self.lr_schedule,
               f"must be one of {LR_SCHEDULES}")
        _check(self.transport in TRANSPORTS, "federation.transport", self.transport, f"must be one of {TRANSPORTS}")
        _check(self.aggregation == "fedavg" or not self.central_dp.enabled, "federation.aggregation",
               self.aggregation, "central DP (federation.central_dp) is calibrated to a clipped mean: use fedavg")
        _check(self.transport == "fp32" or self.secure_aggregation == "none", "federation.transport",
               self.transport, "SecAgg+ encodes updates in its own fixed-point form: use fp32 with secagg+")
        _check(self.aggregation == "fedavg" or self.secure_aggregation == "none", "federation.aggregation",
               self.aggregation, "SecAgg+ reveals only the sum of updates, so only fedavg can follow it")
        _check(self.secure_aggregation in SECURE_AGGREGATION, "federation.secure_aggregation",
               self.secure_aggregation, f"must be one of {SECURE_AGGREGATION}")
        _check(self.secure_aggregation == "none" or not self.central_dp.enabled, "federation.secure_aggregation",
               self.secure_aggregation, "cannot be combined with federation.central_dp: the coordinator cannot clip "
               "updates it never sees")
        _check(self.secagg_clipping_range > 0, "federation.secagg_clipping_range", self.secagg_clipping_range,
               "must be > 0")
        _check(self.rounds >= 1, "federation.rounds", self.rounds, "must be >= 1")
        _check(self.local_epochs > 0, "federation.local_epochs", self.local_epochs, "must be > 0")
        _check(self.lr is None or self.lr > 0, "federation.lr", self.lr, "must be > 0 (or null for train.lr)")
        _check(0 < self.fraction_train <= 1, "federation.fraction_train", self.fraction_train, "must be in (0, 1]")
        _check(0 <= self.fraction_evaluate <= 1, "federation.fraction_evaluate", self.fraction_evaluate,
               "must be in [0, 1]")
        _check(self.min_nodes >= 1, "federation.min_nodes", self.min_nodes, "must be >= 1")
        _check(self.timeout_s > 0, "federation.timeout_s", self.timeout_s, "must be > 0")
        _check(self.node_wait_s >= 0, "federation.node_wait_s", self.node_wait_s, "must be >= 0")
        _check(self.max_update_mb > 0, "federation.max_update_mb", self.max_update_mb, "must be > 0")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    output_dir: str = "runs"


@dataclass(frozen=True)
class Stage:
    """A resolved curriculum stage: rounds ``first..last`` (1-based server rounds), defaults filled in."""

    name: str
    first_round: int
    last_round: int
    task: str
    qtypes: tuple[str, ...]
    trainable: tuple[str, ...]
    lr: float
    local_epochs: float
    budget_end: float                 # share of each hospital's budget spent by the end of this stage
    tag_loss: str = "bce"             # a tags stage's loss (TAG_LOSSES)
    tag_head: str = "local"           # a tags stage's head (TAG_HEADS)


def stages(cfg: ExperimentConfig) -> list[Stage]:
    """The federation's stages in order (one ``main`` stage when ``federation.stages`` is empty)."""
    fed = cfg.federation
    lr = fed.lr if fed.lr is not None else cfg.train.lr
    given = fed.stages or [StageConfig(name="main", rounds=fed.rounds, task=cfg.data.task, qtypes=list(cfg.data.qtypes),
                                       trainable=list(cfg.train.trainable))]
    # each stage's share of the budget: its own, or what the others leave, split by rounds
    rest = 1.0 - sum(s.budget for s in given if s.budget is not None)
    open_rounds = sum(s.rounds for s in given if s.budget is None)
    out, first, end = [], 1, 0.0
    for s in given:
        last = first + s.rounds - 1
        end += s.budget if s.budget is not None else rest * s.rounds / open_rounds
        out.append(Stage(s.name, first, last, s.task, tuple(s.qtypes), tuple(s.trainable),
                         s.lr if s.lr is not None else lr,
                         s.local_epochs if s.local_epochs is not None else fed.local_epochs,
                         1.0 if s is given[-1] else end, s.tag_loss, s.tag_head))
        first = last + 1
    return out


def stage_at(cfg: ExperimentConfig, server_round: int) -> Stage:
    """The stage a server round belongs to (round 0, the starting point, belongs to the first;
    rounds past the plan to the last)."""
    plan = stages(cfg)
    return next((s for s in plan if server_round <= s.last_round), plan[-1])


def lr_window(cfg: ExperimentConfig, stage: Stage, server_round: int) -> tuple[float, float]:
    """The piece of the learning rate's warm-up + cosine that ``server_round``'s local training follows
    (``medvlm.train.lr_factor``): the whole curve every round with ``federation.lr_schedule=round``;
    with ``stage``, round k of a stage's n rounds trains over ((k - 1) / n, k / n)."""
    if cfg.federation.lr_schedule == "round":
        return 0.0, 1.0
    n = stage.last_round - stage.first_round + 1
    k = min(max(server_round, stage.first_round), stage.last_round) - stage.first_round + 1
    return (k - 1) / n, k / n


def for_stage(cfg: ExperimentConfig, stage: Stage) -> ExperimentConfig:
    """The config a stage trains with: its task, question types and trainable parts."""
    from dataclasses import replace

    task = "vqa" if stage.task == "tags" else stage.task   # tags are read from the question rows
    return replace(cfg, data=replace(cfg.data, task=task, qtypes=list(stage.qtypes)),
                   train=replace(cfg.train, trainable=list(stage.trainable)))


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if not candidate.exists():
        raise ValueError(f"config preset {preset!r} not found: use one of {available_presets()} "
                         f"or a path to a .yaml file")
    return candidate


def _read_yaml(path: Path):
    """A config file's settings; YAML that does not parse, or is not a mapping at its top, named by file and line."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"config file {path} is not valid YAML: {getattr(err, 'problem', None) or err}{where}"
                         ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    if not OmegaConf.is_dict(node):
        raise ValueError(f"config file {path} holds a list at its top, not settings (section: then key: value "
                         "lines, as configs/tiny.yaml)")
    return node


def _said(err: OmegaConfBaseException) -> str:
    """OmegaConf's reason on one line, with the key it concerns (its message spans several lines, or is
    None with the reason only in str(err))."""
    text = (getattr(err, "msg", None) or str(err)).splitlines()[0].strip().removeprefix("Merge error: ")
    key = getattr(err, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def _load_yaml_chain(preset: str, seen: tuple[str, ...] = ()) -> list:
    """A preset may name a ``base:`` preset it extends; returns the chain base-first."""
    if preset in seen:
        raise ValueError(f"config preset {preset!r} extends itself through {' -> '.join(seen)}")
    path = _preset_path(preset)
    node = _read_yaml(path)
    base = node.pop("base", None)
    chain = _load_yaml_chain(str(base), seen + (preset,)) if base else []
    return chain + [(path, node)]


def _apply_override(merged, item: str):
    """One ``key=value`` override onto the merged config. Keys are dotted paths; a list entry is
    named by its index (``federation.stages.0.budget=0.2``); values are parsed as YAML."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        node = OmegaConf.select(merged, ".".join(parts[:depth + 1]), throw_on_missing=False)
        if OmegaConf.is_list(node):
            index = parts[depth + 1]
            if not index.isdigit() or int(index) >= len(node):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a list of "
                                 f"{len(node)} entries; name one by its index 0..{len(node) - 1}")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))["value"]
        OmegaConf.update(merged, key, parsed, merge=True)
    except (OmegaConfBaseException, TypeError) as err:
        raise ValueError(f"override {item!r} rejected: {_said(err) if isinstance(err, OmegaConfBaseException) else err}"
                         ) from None
    return merged


def _all_finite(node: object, key: str) -> None:
    """No setting is infinite or NaN (``inf > 0`` passes a range check: a clipping norm of inf is no
    clipping, and a run given one would fail later, in every hospital, far from the key at fault)."""
    if isinstance(node, dict):
        for name, value in node.items():
            _all_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _all_finite(value, f"{key}.{i}")
    elif isinstance(node, float):
        _check(math.isfinite(node), key, node, "write a finite number")


def _rounds_agree(merged, overrides: list[str]) -> None:
    """``federation.rounds`` given as an override beside a curriculum must be its stages' sum: a
    curriculum's length is its stages' rounds (``__post_init__`` replaces ``rounds`` by their sum), so
    a different figure would be dropped without a word and the run would be shorter or longer than asked."""
    given = [item.partition("=")[2] for item in overrides if item.partition("=")[0].strip() == "federation.rounds"]
    plan = OmegaConf.select(merged, "federation.stages", throw_on_missing=False)
    if not given or not plan:
        return
    total = sum(int(s.rounds) for s in plan)
    asked = OmegaConf.select(merged, "federation.rounds")
    if asked != total:
        names = ", ".join(f"{s.name} {s.rounds}" for s in plan)
        raise ValueError(f"override federation.rounds={given[-1].strip()} disagrees with federation.stages, whose "
                         f"rounds add up to {total} ({names}): a curriculum runs its stages' rounds; set "
                         f"federation.stages.N.rounds=... instead, or leave federation.rounds out")


def load_config(preset: str = DEFAULT_PRESET, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Merge the schema defaults, the preset chain and ``key=value`` overrides; validate."""
    merged = OmegaConf.structured(ExperimentConfig)
    for path, node in _load_yaml_chain(preset):
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as err:
            raise ValueError(f"config file {path}: {_said(err)}") from None
    for item in overrides or []:
        merged = _apply_override(merged, item)
    _all_finite(OmegaConf.to_container(merged), "")
    _rounds_agree(merged, overrides or [])
    try:
        return OmegaConf.to_object(merged)  # runs every __post_init__
    except OmegaConfBaseException as err:
        raise ValueError(f"config rejected: {_said(err)}") from None


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_run_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    """The experiment config a Flower run carries: ``preset`` plus space-separated ``overrides``
    (``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run . --run-config``)."""
    import shlex

    preset = str(run_config.get("preset") or DEFAULT_PRESET)
    overrides = shlex.split(str(run_config.get("overrides") or ""))
    return load_config(preset, overrides)
