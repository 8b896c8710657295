"""Typed configuration: model, data and training settings, validated once when a run starts."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from layerwise.errors import LayerwiseError, brief

IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
"""model.builder's form, package.module:function: nothing else reaches importlib or an error message."""

DEPTH_ARCHS = ("cifar_resnet", "resnet", "vgg")
"""Architectures of model.depth layers."""

SPLIT_ARCHS = (*DEPTH_ARCHS, "timm")
"""Architectures cut into model.split modules."""

HEADS = ("paper", "infopro", "dgl", "linear", "predsim", "infopro_softmax", "infopro_contrast", "auglocal")
"""The library's model.head kinds; layerwise.models.heads.make_head builds each (the local-learning methods' from
layerwise/methods/). A kind registered from Python (layerwise.models.register_head) is checked when the network is
built, as model.arch is."""

METHOD_HEADS = {"predsim": "PredSim", "infopro_softmax": "InfoPro", "infopro_contrast": "InfoPro"}
"""The kinds that bring a local loss of their own (layerwise/methods/), with the method's name."""


@dataclass
class ModelConfig:
    """The staged network: J blocks, each followed by its own auxiliary head."""

    arch: str = "simcnn"
    """A registered architecture (`layerwise presets` lists them; layerwise.models.register_model adds one):
    `simcnn` (the paper's SimCNN: P is space-to-depth), `vgg11` (VGG-11-BN cut into blocks: P is a max-pool, heads
    use the paper's VGG auxiliary design and the last head is VGG's own classifier), `custom` (model.builder),
    `cifar_resnet`, `resnet` or `vgg` (split into model.split modules: layerwise.models.resnet), `timm` (the timm
    model model.name, split into model.split modules: layerwise.models.timm_models)."""
    k: int = 3
    """The paper's k: hidden layers of each auxiliary problem, the block included. Heads have k-1 convs."""
    widths: list[int] = field(default_factory=lambda: [128, 128, 256, 256])
    """Output channels of each block (simcnn, vgg11: J = len(widths))."""
    downsample_at: list[int] = field(default_factory=lambda: [2])
    """Indices of the blocks that open with P. Index 0 downsamples the input itself (ImageNet SimCNN)."""
    batchnorm: bool = True
    """BatchNorm after each block's conv. The paper drops it for k=1; a conv without BN then gets a bias."""
    head_batchnorm: bool = True
    """BatchNorm in the auxiliary heads: after each head conv, and after the averaging. Off, head convs get a bias.
    The paper has none for k=1 (the k=1 presets turn it off). The VGG-11 last head (VGG's classifier) has none
    either way."""
    classifier_dropout: float = 0.0
    """Dropout before each hidden linear layer of VGG-11's last head (VGG's own classifier). 0 as in the released
    greedy VGG-11; torchvision's vgg11_bn, the end-to-end baseline, has 0.5. VGG-11 only."""
    bn_weight_init: str = "ones"
    """Initial BatchNorm weight: `ones` (PyTorch today) or `uniform` in [0, 1), as PyTorch 0.4 did when the
    paper's code ran, for a faithful replica of its SimCNN runs. SimCNN only (VGG-11 keeps torchvision's)."""
    conv_bias: bool | None = None
    """Bias in the block convs. None means `not batchnorm`; VGG-11-BN keeps its biases (True)."""
    aux_width: int = 0
    """Channels of the head convs. 0 means aux_width_factor x the block's width."""
    aux_width_factor: float = 1.0
    """Head conv width relative to the block's width when aux_width is 0 (CIFAR 1, ImageNet 2)."""
    head_pool: int = 2
    """Heads average the map to head_pool x head_pool before BN and the linear layer."""
    in_channels: int = 3
    """Channels of the images: 1 decodes them as grayscale, 3 as RGB (data.mean and data.std give one value per
    channel)."""
    depth: int = 0
    """Layers of the ResNet or VGG to split: cifar_resnet 6n+2 (20, 32, 56, 110), resnet 18/34/50/101/152,
    vgg 11/13/16/19. Unused by simcnn, vgg11 and custom."""
    split: int = 0
    """K, the number of locally trained modules cifar_resnet, resnet, vgg and timm are cut into."""
    stem: str = "imagenet"
    """resnet's first layers: `imagenet` (7x7 stride-2 conv, max-pool) or `cifar` (3x3 stride-1 conv, no
    max-pool), for 32 px images. A timm model's `cifar` stem: its first conv at stride 1 (same size out) and the
    max-pool before its first block dropped."""
    name: str = ""
    """model.arch=timm: the timm model (`timm.list_models()`: resnet18, efficientnet_b0, convnext_atto, ...)."""
    weights: str = ""
    """model.arch=timm: a local weights file for fine-tuning (.safetensors, or a state_dict that torch reads with
    weights_only), loaded before the cut; a classifier of another number of classes is left as initialised."""
    head: str = "paper"
    """The heads the library builds for SimCNN and for networks that bring none (model.arch=custom without heads,
    the split ResNets' local modules), and with them the local loss: `paper` (k-1 convs, averaging, BN, linear, as
    above), `infopro` (InfoPro's: one conv, global pooling, two linear layers), `dgl` (DGL's: averaging to a
    quarter of the size, three 1x1 convs, averaging to 2x2, four linear layers) or `linear` (global pooling and one
    linear layer: InfoPro's 'Greedy SL'), each with cross-entropy; or a local-learning method's (layerwise/methods/,
    docs/methods.md): `predsim` (Nokland & Eidnes 2019: model.head_beta), `infopro_softmax` and `infopro_contrast`
    (InfoPro, Wang et al. 2021: a decoder's reconstruction and a task loss, model.head_lambdas), `auglocal` (Ma et
    al. 2024: copies of later layers, model.aux_depth; cifar_resnet, one module per layer). All but `paper`
    have a fixed form (model.k and the aux settings do nothing). The last module's head is the delivered network's
    classifier, trained with cross-entropy. VGG-11 keeps the paper's VGG heads."""
    head_beta: float = 0.99
    """model.head=predsim: the loss is beta x the similarity-matching loss of the head's own 3x3 conv output +
    (1 - beta) x the cross-entropy of its prediction; their 0.99."""
    head_lambdas: list[float] = field(default_factory=list)
    """model.head=infopro_*: (lambda1, lambda2) of the first module and of the last local one (module K-1), four
    numbers, interpolated linearly between (InfoPro's code): module i minimises lambda1 x reconstruction + lambda2
    x task loss. Empty: InfoPro's released pair for model.depth and model.split of cifar_resnet (their Contrast
    pairs, which the Softmax runs reuse: docs/methods.md); other networks need them set."""
    head_temperature: float = 0.07
    """model.head=infopro_contrast: the supervised contrastive loss's temperature (their 0.07)."""
    aux_depth: int = 2
    """model.head=auglocal: d, the later layers copied into the first module's auxiliary network (their README:
    2 for ResNet-32, 3 for ResNet-110); the last d + 1 layers form the final module, so model.split = the layers
    - d."""
    aux_pyramid: float = 0.5
    """model.head=auglocal: c, how far the auxiliary depth falls from the first module to the last local one:
    d_l = max(1, round(d (1 - l c / K) + l c / K)), K the index of the last module with an auxiliary network."""
    builder: str = ""
    """model.arch=custom: the import path `package.module:function` of a function returning the network's
    stages (a list of nn.Modules), a (stages, heads) pair or a StagedNet. Loading the run later imports it, which
    `eval`, `export` and `predict` do only with --trust-code."""
    builder_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of model.builder (YAML values), plus num_classes when the function takes it."""
    num_classes: int = 10
    """Classes the network is sized for where there is no data to count them (`layerwise presets`, `bench`). A
    run takes the number of classes from its data."""

    def __post_init__(self) -> None:
        # model.arch names a registered architecture, which the registry checks when it builds the network (a
        # user's register_model may add one after the config is read): config.py imports nothing of the models
        _check(1 <= self.k <= 3, f"model.k must be 1, 2 or 3 (got {self.k})")
        _check(len(self.widths) >= 1, "model.widths needs at least one block")
        _check(all(w >= 1 for w in self.widths), "model.widths must all be positive")
        _check(
            all(0 <= j < len(self.widths) for j in self.downsample_at),
            f"model.downsample_at must name blocks 0..{len(self.widths) - 1} (got {self.downsample_at})",
        )
        _check(self.aux_width >= 0, "model.aux_width must be >= 0 (0 = relative to the block width)")
        _check(self.aux_width_factor > 0, "model.aux_width_factor must be > 0")
        _check(self.head_pool >= 1, "model.head_pool must be >= 1")
        _check(self.in_channels in (1, 3), "model.in_channels must be 1 (grayscale) or 3 (RGB)")
        _check(self.num_classes >= 2, "model.num_classes must be >= 2")
        _check(self.stem in ("imagenet", "cifar"), f"model.stem must be 'imagenet' or 'cifar' (got {brief(self.stem)})")
        _check(
            (self.depth > 0) == (self.arch in DEPTH_ARCHS) and (self.split > 0) == (self.arch in SPLIT_ARCHS),
            f"model.depth and model.split (K) go with model.arch {', '.join(DEPTH_ARCHS)}, model.split alone with "
            "timm, and only with them",
        )
        _check(bool(self.name) == (self.arch == "timm"), "model.name goes with model.arch=timm, and only with it")
        _check(not self.weights or self.arch == "timm", "model.weights goes with model.arch=timm only")
        _check(
            not self.name or IDENTIFIER.fullmatch(self.name.replace(".", "_")) is not None,
            f"model.name must be a timm model's name (got {brief(self.name)})",
        )
        _check(
            IDENTIFIER.fullmatch(self.head) is not None,
            f"model.head must be one of {', '.join(HEADS)} or a kind registered from Python (got {brief(self.head)})",
        )
        _check(0 <= self.head_beta <= 1, "model.head_beta must be in [0, 1] (their 0.99)")
        _check(
            len(self.head_lambdas) in (0, 4) and all(w >= 0 for w in self.head_lambdas),
            "model.head_lambdas needs four numbers >= 0: lambda1 and lambda2 of the first module, then of module K-1",
        )
        _check(self.head_temperature > 0, "model.head_temperature must be > 0 (their 0.07)")
        _check(self.aux_depth >= 1, "model.aux_depth must be >= 1 (AugLocal's d)")
        _check(0 <= self.aux_pyramid <= 1, "model.aux_pyramid must be in [0, 1] (AugLocal's c: 0.5)")
        _check(
            self.head == "paper" or self.arch != "vgg11",
            f"model.head={self.head} is not for vgg11 (its heads are VGG's)",
        )
        _check(
            bool(self.builder) == (self.arch == "custom"),
            "model.builder (package.module:function) goes with model.arch=custom, and only with it",
        )
        _check(
            not self.builder or IMPORT_PATH.fullmatch(self.builder) is not None,
            f"model.builder must be an import path package.module:function (got {brief(self.builder, 80)})",
        )
        _check(0 <= self.classifier_dropout < 1, "model.classifier_dropout must be in [0, 1)")
        _check(
            self.classifier_dropout == 0 or self.arch == "vgg11",
            "model.classifier_dropout applies to VGG-11's classifier only; leave it at 0 for simcnn",
        )
        _check(self.bn_weight_init in ("ones", "uniform"), "model.bn_weight_init must be 'ones' or 'uniform'")
        _check(
            self.bn_weight_init == "ones" or self.arch == "simcnn",
            "model.bn_weight_init=uniform is for SimCNN; VGG-11 keeps torchvision's initialisation",
        )


@dataclass
class DataConfig:
    """How images are read, split and augmented."""

    augment: str = "cifar"
    """`cifar`: random crop with zero padding + flip, data decoded once into memory (on the training device
    when it fits). `imagenet`: RandomResizedCrop + flip, val resize + centre crop, streamed by a DataLoader."""
    image_size: int = 32
    """Side of the training crop and of the images the network sees."""
    crop_padding: int = 4
    """Padding before the random crop (`cifar` augmentation)."""
    crop_padding_mode: str = "zeros"
    """What the crop's padding holds: `zeros` (black, torchvision's RandomCrop fill, the paper) or `reflect` (the
    image mirrored about its edge pixels, as InfoPro pads)."""
    flip: str = "random"
    """The training flips (`cifar` augmentation): `random` (each image mirrored with probability 1/2 in each epoch,
    the paper) or `alternate` (airbench, Jordan 2024: image i mirrored in the epochs e of its stage where i + e is
    odd, so every image is seen both ways in any two consecutive epochs, half of them mirrored each epoch; the
    training set's order is already shuffled by the held-out split)."""
    cutout: int = 0
    """Cutout (DeVries & Taylor 2017, `cifar` augmentation): a square of this side, centred at a point drawn
    uniformly in each training image and clipped at its border, set to the mean colour after the crop and flip.
    0: off (the paper)."""
    mix: str = "none"
    """`mixup` (Zhang et al. 2018: each training image blended with a partner, lam x image + (1 - lam) x
    partner) or `cutmix` (Yun et al. 2019: a box of the partner pasted in, lam the share left), with lam ~
    Beta(mix_alpha, mix_alpha) and a partner per image drawn in the epoch plan (so the prefix cache and resume
    stay exact); the target is lam on the image's label and 1 - lam on the partner's. `cifar` augmentation only.
    `none`: off (the paper)."""
    mix_alpha: float = 1.0
    """The Beta distribution's parameter for data.mix."""
    resize_size: int = 256
    """Validation images are resized to this (shorter side), then centre-cropped (`imagenet` augmentation)."""
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])
    val_size: float = 0.1
    """Images held out of the training data when it has no validation split (and no val_path): a count, or a
    fraction if < 1. 0 holds none out: without val_path the run then has no validation, and its metrics and
    summary give training figures instead, saying so."""
    val_path: str | None = None
    """Data scored after every epoch instead of a held-out split or the source's own val/ folder: any source
    `--data` accepts (a CIFAR-10 python archive: its test_batch), its classes mapped to the run's by name."""
    split_seed: int = 0
    """Seed of the held-out split; fixed apart from train.seed so runs with other seeds share a validation set."""
    workers: int = 4
    """DataLoader worker processes (`imagenet` augmentation only). Sharded data has this many readers per process
    (at least 1) whatever the CPUs, so that every process deals the shards alike."""
    shuffle_buffer: int = 1000
    """Sharded training data: the encoded images each reader holds to shuffle its shards' samples (0: none)."""
    decode: str = "cpu"
    """Sharded data (`imagenet` augmentation): where images are decoded and cropped, `cpu` (in the DataLoader
    workers) or `gpu` (batched decode_jpeg and the crops on the training GPU; layerwise.data.decoding)."""
    corrupt: str = "fatal"
    """Sharded data: a sample that cannot be decoded stops the run (`fatal`) or is skipped with a warning and
    counted in the metrics (`skip`)."""

    def __post_init__(self) -> None:
        _check(self.augment in ("cifar", "imagenet"), "data.augment must be 'cifar' or 'imagenet'")
        _check(self.image_size >= 1, "data.image_size must be >= 1")
        _check(self.crop_padding >= 0, "data.crop_padding must be >= 0")
        _check(self.crop_padding_mode in ("zeros", "reflect"), "data.crop_padding_mode must be 'zeros' or 'reflect'")
        _check(
            self.crop_padding_mode == "zeros" or self.crop_padding < self.image_size,
            "data.crop_padding_mode=reflect needs data.crop_padding below data.image_size",
        )
        _check(
            self.cutout >= 0 and (self.cutout == 0 or self.augment == "cifar"),
            "data.cutout must be >= 0 and goes with data.augment=cifar (in-memory data)",
        )
        _check(self.flip in ("random", "alternate"), f"data.flip must be random or alternate (got {brief(self.flip)})")
        _check(self.flip == "random" or self.augment == "cifar", "data.flip=alternate goes with data.augment=cifar")
        _check(
            self.mix in ("none", "mixup", "cutmix"), f"data.mix must be none, mixup or cutmix (got {brief(self.mix)})"
        )
        _check(
            self.mix == "none" or self.augment == "cifar",
            "data.mix goes with data.augment=cifar (in-memory data)",
        )
        _check(self.mix_alpha > 0, "data.mix_alpha must be > 0")
        _check(self.resize_size >= self.image_size, "data.resize_size must be >= data.image_size")
        _check(
            len(self.mean) == len(self.std) and len(self.mean) > 0, "data.mean and data.std need one value per channel"
        )
        _check(all(s > 0 for s in self.std), "data.std values must be > 0")
        _check(self.val_size >= 0, "data.val_size must be >= 0 (a count, or a fraction below 1)")
        _check(self.val_path != "", "data.val_path must be a path, or null for none")
        _check(self.workers >= 0, "data.workers must be >= 0")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        _check(self.decode in ("cpu", "gpu"), f"data.decode must be cpu or gpu (got {brief(self.decode)})")
        _check(self.corrupt in ("fatal", "skip"), f"data.corrupt must be fatal or skip (got {brief(self.corrupt)})")


PRECISIONS = ("auto", "fp32", "bf16")
MODES = ("greedy", "e2e", "decoupled")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Optimisation, shared by every strategy. The defaults are the paper's CIFAR-10 recipe."""

    mode: str = "greedy"
    """`greedy` (Algorithm 1: one block at a time, earlier blocks frozen), `e2e` (the same final network, every
    block plus the last head, trained jointly as the reference) or `decoupled` (DGL: every block at once, each
    from its own head on the detached output of the block before, each with its own optimizer)."""
    placement: str = "single"
    """Where a decoupled run's blocks train: `single` (every process holds every block; under torchrun the
    processes split each batch) or `pipeline` (torchrun's P processes each hold a group of consecutive blocks,
    balanced by measured step time, and pass activations forward; P <= J)."""
    pipeline_processes: int = 0
    """P, the processes of one pipeline (train.placement=pipeline); 0: every process torchrun started. With P
    below their number N, the N processes form N / P replicas of a P-process pipeline that split each batch, and
    the replicas' copies of each block group train as DDP does."""
    replay: int = 0
    """M, for a pipeline (DGL's asynchronous variant): each process after the first keeps the last M batches it
    received and trains on them again while its upstream is slower, instead of waiting. 0: synchronous, every
    block trains once on every batch, as in one process. Results with M > 0 depend on the processes' speeds."""
    replay_reuse: int = 1
    """How many times a buffered batch may be replayed (train.replay)."""
    epochs_per_block: int = 50
    """Epochs for each block in greedy mode; the e2e and decoupled runs train for this many epochs in all (every
    block at once)."""
    block_epochs: list[int] = field(default_factory=list)
    """Epochs of each greedy block, one number per block, in place of epochs_per_block (earlier blocks may deserve
    more or fewer); the e2e and decoupled runs train for their sum. The step schedule's decays keep their places
    as fractions of each stage (lr_step counts epochs of epochs_per_block). Empty: epochs_per_block for every
    block."""
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    """Nesterov momentum (InfoPro's recipe uses it); the paper's SGD has plain momentum."""
    label_smoothing: float = 0.0
    """Smoothed targets for the trained head's cross-entropy: 1 - label_smoothing + label_smoothing / classes on
    the label, label_smoothing / classes on every other class (torch's F.cross_entropy). The loss evaluation
    reports stays plain cross-entropy. 0 in the paper."""
    weight_decay: float = 5e-4
    lr_step: int = 15
    """The learning rate is multiplied by lr_gamma every lr_step epochs (counted within each block; a stage of
    another length than epochs_per_block, with train.block_epochs, has its decays at the same fractions of it)."""
    schedule: str = "step"
    """`step` (the paper's: lr x lr_gamma every lr_step epochs, set at each epoch), `cosine` (set at every step,
    from lr down to 0 over the stage) or `triangle` (every step: linearly down to 0, airbench's one-cycle). The
    per-step schedules restart with each greedy block and span the whole run end to end or decoupled."""
    warmup_epochs: float = 0.0
    """Linear warm-up at the start of each stage of a `cosine` or `triangle` schedule: warmup_from + (lr -
    warmup_from) x (t + 1) / W over its first W = round(warmup_epochs x steps per epoch) steps."""
    warmup_from: float = 0.0
    """The rate the warm-up starts from (InfoPro's 0.01; 0: from nothing)."""
    lr_gamma: float = 0.2
    reset_momentum_at_decay: bool = True
    """Clear SGD momentum at each decay, as the released code does by rebuilding its optimizer."""
    ema: float = 0.0
    """Decay of an exponential moving average of the trained stage's weights and BN statistics, updated after each
    step with decay min(ema, (1 + t) / (10 + t)) at update t (TensorFlow's ExponentialMovingAverage with
    num_updates). The average is what each epoch evaluates, what the checkpoints keep beside the weights, and what
    the stage leaves behind: the next greedy block trains on the averaged, frozen prefix. 0: off (the paper)."""
    sim_loss: float = 0.0
    """Weight of Nokland & Eidnes's (2019) similarity-matching loss, added to each loss head's cross-entropy: the
    mean squared difference between the cosine similarities of the batch's block outputs (each channel's
    standard deviation over the positions, centred over the channels) and those of their targets. Computed on
    the block's output itself, without the extra conv their code learns for it. Under torchrun each process
    compares its own share of the batch. 0: off (the paper)."""
    ensemble: str = "logits"
    """What the ensemble Z = sum_j 2^j z_j adds up: `logits` (the paper's CIFAR code) or `softmax` (ImageNet)."""
    eval_flip: bool = False
    """Test-time flip in the per-epoch evaluation: each head's logits averaged over the image and its mirror (as
    `layerwise eval --flip`). Off in the paper."""
    train_eval_size: int = 2000
    """Training images (no augmentation, eval mode) scored after every epoch for train top-1/top-5. 0 = none."""
    cache: str = "none"
    """Frozen-prefix cache for greedy blocks after the first: `none` (recompute the frozen blocks every step),
    `device` (on the training device), `host` (CPU RAM, pinned when training on a GPU) or `disk` (memory-mapped
    in the run directory). The frozen blocks' output is computed once per cached view instead of every epoch."""
    cache_views: int = 1
    """Augmented views cached per image; epoch e trains on view e mod cache_views (see docs/benchmarks.md)."""
    recompute_activations: bool = False
    """Keep only each trained conv unit's input for the backward pass and recompute its conv, BN and ReLU
    there: less activation memory for about one more forward pass of the trained blocks. Same results."""
    block_chunks: int = 0
    """Greedy stages whose block feeds only its head's 2x2 average pooling (VGG-11's heads) run that block in this
    many chunks of the batch, in the forward and the backward pass (models/pooled.py): its full-resolution output
    never exists for the whole batch at once, for three more runs of its conv. The same training up to float
    rounding. 0: off; other stages and networks are unaffected."""
    precision: str = "auto"
    """`auto` (bf16 autocast on a GPU, fp32 on the CPU), `fp32`, or `bf16` (autocast and channels_last on any
    device: much faster on CPUs with AMX or AVX-512 BF16, slow on others; see docs/benchmarks.md)."""
    compile: str = "none"
    """torch.compile mode for each stage's forward and backward: `none`, `default`, `reduce-overhead` (CUDA
    graphs), `max-autotune` or `max-autotune-no-cudagraphs`. Each stage compiles afresh, which takes a while."""
    min_gain: float | None = None
    """Adaptive depth (greedy): stop after the first block whose own head improves validation top-1 by less than
    this many points over the block before, and deliver the blocks before it. None: train every block."""
    sync_bn: bool = False
    """Under torchrun on GPUs, compute the trained module's BN statistics over the global batch (SyncBatchNorm).
    Off by default, as the paper's DataParallel kept per-GPU statistics: each process then normalises with
    its own share's statistics, and rank 0's running statistics are kept. SyncBatchNorm does not run on the CPU."""
    divergence_factor: float = 10.0
    """Stop a stage whose training loss diverges: a running mean over 50 steps (train.divergence's DIVERGENCE_WINDOW)
    above this many times the stage's starting level (the mean of its first 50 steps, at least ln(classes), the
    loss of a uniform guess); a non-finite loss stops it too. Read on the device every 50 steps and at the end
    of each epoch. 0 turns the mean check off (the non-finite check stays)."""
    tensorboard: bool = False
    """Also write each epoch's metrics as TensorBoard event files in RUN/tensorboard (rank 0), for those who watch
    runs there: needs the tensorboard package (pip install 'layerwise[tensorboard]'). Step = the run's epoch count
    over every stage; a resumed run drops the events of the epochs it trains again."""
    seed: int = 0
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    def epochs(self, block: int | None = None) -> int:
        """Epochs of greedy block `block`'s stage, or with None of a stage that trains every block at once."""
        if not self.block_epochs:
            return self.epochs_per_block
        return self.block_epochs[block] if block is not None else sum(self.block_epochs)

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"train.mode must be {', '.join(MODES)} (got {brief(self.mode)})")
        _check(self.placement in ("single", "pipeline"), "train.placement must be 'single' or 'pipeline'")
        _check(
            self.placement == "single" or self.mode == "decoupled",
            "train.placement=pipeline puts blocks that train at once on different processes; it needs "
            "train.mode=decoupled",
        )
        _check(self.replay >= 0 and self.replay_reuse >= 0, "train.replay and train.replay_reuse must be >= 0")
        _check(
            self.pipeline_processes >= 0 and (self.pipeline_processes == 0 or self.placement == "pipeline"),
            "train.pipeline_processes (>= 0) goes with train.placement=pipeline",
        )
        _check(
            self.replay == 0 or (self.mode == "decoupled" and self.placement == "pipeline"),
            "train.replay keeps batches for a pipeline process whose upstream is slower; it needs "
            "train.mode=decoupled and train.placement=pipeline",
        )
        _check(self.epochs_per_block >= 1, "train.epochs_per_block must be >= 1")
        _check(all(e >= 1 for e in self.block_epochs), "train.block_epochs must all be >= 1 (one per block)")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(0 <= self.momentum < 1, "train.momentum must be in [0, 1)")
        _check(not self.nesterov or self.momentum > 0, "train.nesterov needs train.momentum above 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(self.lr_step >= 1, "train.lr_step must be >= 1")
        _check(self.schedule in ("step", "cosine", "triangle"), "train.schedule must be step, cosine or triangle")
        greedy = self.mode == "greedy" and self.block_epochs
        shortest = min(self.block_epochs) if greedy else self.epochs()  # the shortest stage's epochs
        _check(
            0 <= self.warmup_epochs < shortest and (self.warmup_epochs == 0 or self.schedule != "step"),
            "train.warmup_epochs must be below every stage's epochs and goes with train.schedule cosine or triangle",
        )
        _check(self.warmup_from >= 0, "train.warmup_from must be >= 0 (InfoPro's 0.01)")
        _check(0 <= self.ema < 1, "train.ema must be in [0, 1) (0: off)")
        _check(
            self.ema == 0 or self.placement == "single",
            "train.ema averages the weights one process holds; it cannot be combined with train.placement=pipeline",
        )
        _check(self.sim_loss >= 0, "train.sim_loss must be >= 0 (0: off)")
        _check(
            not (self.sim_loss and self.block_chunks),
            "train.sim_loss reads the block's whole output, which train.block_chunks never forms; choose one",
        )
        _check(0 < self.lr_gamma <= 1, "train.lr_gamma must be in (0, 1]")
        _check(self.ensemble in ("logits", "softmax"), "train.ensemble must be 'logits' or 'softmax'")
        _check(self.train_eval_size >= 0, "train.train_eval_size must be >= 0")
        _check(self.divergence_factor >= 0, "train.divergence_factor must be >= 0 (0 turns the check off)")
        _check(0 <= self.seed < 2**31, "train.seed must be in [0, 2^31)")
        _check(self.cache in ("none", "device", "host", "disk"), "train.cache must be none, device, host or disk")
        _check(self.cache_views >= 1, "train.cache_views must be >= 1")
        _check(self.block_chunks >= 0, "train.block_chunks must be >= 0 (0: off)")
        _check(
            not (self.sync_bn and self.block_chunks),
            "train.sync_bn and train.block_chunks cannot be combined: the chunked block computes its BatchNorm "
            "statistics over this process's batch",
        )
        _check(self.precision in PRECISIONS, f"train.precision must be {', '.join(PRECISIONS)}")
        _check(
            self.compile in COMPILE_MODES,
            f"train.compile must be one of {', '.join(COMPILE_MODES)} (got {brief(self.compile)})",
        )
        _check(
            self.compile == "none" or not self.recompute_activations,
            "train.compile and train.recompute_activations cannot be combined; choose one",
        )
        _check(
            self.min_gain is None or self.mode == "greedy",
            "train.min_gain decides how many greedy blocks to train; it needs train.mode=greedy",
        )
        _check(
            not (self.sync_bn and self.placement == "pipeline"),
            "train.sync_bn and train.placement=pipeline cannot be combined (SyncBatchNorm would synchronise every "
            "process, not the replicas of a block)",
        )
        _check(
            not self.sync_bn or (self.compile == "none" and not self.recompute_activations),
            "train.sync_bn cannot be combined with train.compile or train.recompute_activations (SyncBatchNorm's "
            "collectives would be traced or run again in the backward pass); choose one",
        )
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"train.device must be auto, cpu, cuda or cuda:N (got {brief(self.device)})",
        )


@dataclass
class RunConfig:
    """Everything that defines a run. Saved resolved in the run directory as config.yaml."""

    preset: str = "custom"
    description: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    """The paper's reported numbers for this set-up (top-1 %, ensemble top-1 %, parameters in millions)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(
            len(self.data.mean) == self.model.in_channels,
            f"data.mean and data.std need model.in_channels={self.model.in_channels} values",
        )
        _check(
            self.train.cache == "none" or self.data.augment == "cifar",
            "train.cache needs in-memory data (data.augment=cifar); set train.cache=none",
        )
        method, t = METHOD_HEADS.get(self.model.head), self.train
        _check(
            method is None or not (t.sim_loss or t.block_chunks),
            f"model.head={self.model.head} brings {method}'s own local loss; it cannot be combined with "
            "train.sim_loss or train.block_chunks",
        )
        _check(
            method != "InfoPro" or (t.mode == "decoupled" and t.placement == "single"),
            f"model.head={self.model.head} compares each module's output with the image, so every module trains at "
            "once in one pipeline: set train.mode=decoupled (and train.placement=single)",
        )
        _check(
            self.model.head != "infopro_contrast" or self.data.mix == "none",
            "model.head=infopro_contrast contrasts images by their one label; data.mix blends two: choose one",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def idle_settings(cfg: RunConfig) -> dict[str, str]:
    """The settings that do nothing in cfg, each with the reason: one the user sets for a new run is refused
    (refuse_idle) instead of silently ignored. A saved config.yaml records every field, idle ones included, and
    loads as it is."""
    t, d, m = cfg.train, cfg.data, cfg.model
    idle = {}
    if t.schedule != "step":
        why = f"train.schedule={t.schedule} sets the rate at every step, without the step schedule's decays"
        idle.update(dict.fromkeys(["train.lr_step", "train.lr_gamma", "train.reset_momentum_at_decay"], why))
        if t.block_epochs:  # the step schedule stretches lr_step by epochs_per_block; nothing else reads it
            idle["train.epochs_per_block"] = "train.block_epochs gives every stage's epochs"
    if d.augment == "cifar":
        idle["data.workers"] = "data.augment=cifar keeps the images in memory, without DataLoader workers"
        idle["data.resize_size"] = "only data.augment=imagenet resizes its validation images"
        why = "data.augment=cifar decodes shards into memory once"
        idle.update(dict.fromkeys(["data.shuffle_buffer", "data.corrupt", "data.decode"], why))
    else:
        idle["data.crop_padding"] = "data.augment=imagenet crops without padding (RandomResizedCrop)"
    if d.augment != "cifar" or d.crop_padding == 0:
        idle["data.crop_padding_mode"] = "no crop is padded (data.augment=cifar with data.crop_padding above 0)"
    if t.warmup_epochs == 0:
        idle["train.warmup_from"] = "train.warmup_epochs is 0"
    if d.mix == "none":
        idle["data.mix_alpha"] = "data.mix is none"
    if t.cache == "none":
        idle["train.cache_views"] = "train.cache is none"
    if t.replay == 0:
        idle["train.replay_reuse"] = "train.replay is 0"
    if m.head != "paper":
        why = f"model.head={m.head} builds heads of a fixed form"
        keys = ["model.k", "model.aux_width", "model.aux_width_factor", "model.head_pool", "model.head_batchnorm"]
        idle.update(dict.fromkeys(keys, why))
    infopro = ("infopro_softmax", "infopro_contrast")
    readers = {"model.head_beta": ("predsim",), "model.head_lambdas": infopro, "model.head_temperature": infopro[1:],
               "model.aux_depth": ("auglocal",), "model.aux_pyramid": ("auglocal",)}  # fmt: skip
    for key, kinds in readers.items():
        if m.head not in kinds:
            idle[key] = f"only model.head={' or '.join(kinds)} reads it"
    return idle


def refuse_idle(cfg: RunConfig, given: set[str]) -> None:
    """One line for the first setting in `given` (dotted keys the user set: preset, config file, --set) that does
    nothing in cfg."""
    idle = idle_settings(cfg)
    for key in sorted(given & idle.keys()):
        raise LayerwiseError(f"bad config: {key} has no effect here ({idle[key]}); remove it")


def given_keys(values: dict[str, Any]) -> set[str]:
    """The dotted keys of a (partial) config mapping's settings: {'train': {'lr': 1}} -> {'train.lr'}."""
    return {f"{section}.{key}" for section, part in values.items() if isinstance(part, dict) for key in part}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LayerwiseError(f"bad config: {message}")


def _shown(key: Any) -> str:
    """A key as an error message shows it: as written, or quoted when it holds a line break or other control (or
    is too long to show whole)."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else brief(key, 60)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return value converted to hint (int -> float only), or raise a one-line error naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise LayerwiseError(f"bad config: {where} must be a list (got {brief(value)})")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LayerwiseError(f"bad config: {where} must be a mapping (got {brief(value)})")
        return {str(k): _check_type(v, args[1], f"{where}.{_shown(k)}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -(2**63) <= value < 2**63:  # torch takes no larger count
            raise LayerwiseError(f"bad config: {where} must be an int of at most 63 bits (got {brief(value)})")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, int) and not isinstance(value, bool):  # an int too large for a float is not a number
            with contextlib.suppress(OverflowError):
                value = float(value)
        ok = isinstance(value, float) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is Any:  # builder arguments: what YAML can hold
        ok = _plain(value)
    else:  # pragma: no cover - every field uses one of the types above
        raise TypeError(hint)
    if not ok:
        kind = "a YAML value (numbers, strings, lists, mappings)" if hint is Any else hint.__name__
        raise LayerwiseError(f"bad config: {where} must be {kind} (got {brief(value)})")
    return value


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_plain, value))
    return value is None or isinstance(value, (bool, int, float, str))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise LayerwiseError(f"bad config: {where or 'the config'} must be a mapping (got {brief(values)})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise LayerwiseError(
            f"bad config: unknown key {where + '.' if where else ''}{_shown(unknown[0])}; valid: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{_shown(name)}" if where else _shown(name)
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key)
        else:
            kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; every problem becomes a one-line LayerwiseError."""
    return _build(RunConfig, values, "")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge override into a copy of base (mappings merge, everything else replaces).

    A section that is a mapping stays one: `--set train=3` is an error, not a reset to the defaults.
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict):
            if not isinstance(value, dict):
                raise LayerwiseError(f"bad config: {key} must be a mapping of settings (got {brief(value)})")
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _AliasFound(yaml.YAMLError):
    """A YAML alias (`*name`) in a config, refused where the document is composed (see _ConfigLoader)."""


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader without aliases. An alias (`*a`) repeats an anchored node (`&a`), so a few hundred
    bytes of nested aliases describe billions of nodes ("billion laughs"): built as shared references they cost
    nothing, but everything that walks, copies or prints the config would then take hours. Configs have no use
    for them (merge keys, `<<: *a`, included), so the first one is refused before it is built."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(f"*{event.anchor} at line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)


class _ConfigDumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper that writes a value referenced twice out twice, never as an anchor and alias: a
    saved config.yaml is then one the config loader reads."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def load_yaml(text: str, what: str) -> Any:
    """A config's YAML (safe: plain values only, no aliases), its every failure one line naming `what`: a syntax
    error, an alias, a value Python cannot hold (an integer of thousands of digits, a 13th month), or nesting
    deep enough to exhaust the stack (a RecursionError, which is not a YAMLError)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except _AliasFound as e:
        raise LayerwiseError(
            f"{what} uses a YAML alias ({e}); configs take no anchors or aliases: write the value out"
        ) from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LayerwiseError(f"{what} is not valid YAML ({first}); fix its syntax") from None
    except (ValueError, OverflowError) as e:
        raise LayerwiseError(f"{what} holds a value Python cannot read ({brief(str(e), 80)}); fix it") from None
    except RecursionError:
        raise LayerwiseError(f"{what} is nested too deeply to be a config; fix it") from None


def dump_yaml(values: dict[str, Any]) -> str:
    """YAML of plain values that load_yaml reads back: block style, keys in their order, no aliases."""
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False)


def parse_assignment(text: str) -> dict[str, Any]:
    """`train.lr_step=4` -> {'train': {'lr_step': 4}}; the value is read as YAML."""
    if "=" not in text:
        raise LayerwiseError(f"bad --set {brief(text)}: write SECTION.KEY=VALUE, for example train.lr_step=4")
    key, raw = text.split("=", 1)
    value = load_yaml(raw, f"bad --set {brief(text, 60)}: the value") if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
