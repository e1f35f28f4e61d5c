"""Run configuration: one typed view of ``[tool.flwr.app.config]``.

Flower hands every ServerApp and ClientApp the run config as a flat mapping of
kebab-case keys (``context.run_config``). :class:`RunConfig` is the typed,
validated form of that mapping; the ``pollen`` command line builds the same
mapping from its options and passes it to ``flwr run`` as overrides, so the CLI
and ``flwr run .`` run exactly the same federation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pollen.compress import parse as parse_codec
from pollen.data.load import CIFAR10_IMAGE_SIZE, is_cifar10, native_image_size
from pollen.errors import PollenError
from pollen.models.pretrained import WEIGHT_SUFFIXES
from pollen.models.registry import MODELS, Recipe

PARTITION_METHODS = ("iid", "dirichlet")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
#: Deliberate client misbehaviour for tests and experiments (see pollen.client.app.FAULTS).
FAULT_KINDS = ("nan", "scale", "signflip", "noise", "arch")
#: Poisoned updates the attack harness (``malicious``/``attack``) can send.
ATTACK_KINDS = ("signflip", "noise", "scale")
#: Smallest and largest side of ``image-size`` (Keras's MobileNetV2 needs 32 or more).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 1024
#: ``fine-tune-lr`` as a share of ``learning-rate`` unless set (docs/images.md).
FINE_TUNE_LR_FACTOR = 0.1

#: Values of ``dp``: off, client-level, example-level (DP-SGD on each client).
DP_LEVELS = ("", "client", "example")
#: Older spellings of ``dp`` (it was a switch meaning client-level DP).
DP_ALIASES = dict.fromkeys(("true", "1", "yes", "on"), "client") | dict.fromkeys(
    ("false", "0", "no", "off", "none"), ""
)


@dataclass(frozen=True)
class RunConfig:
    """Everything a federation run needs to know, with its defaults.

    Attributes:
        num_rounds: Federated rounds to run. Default 3.
        model: Registry name of the model every client builds (see
            ``pollen.models.registry.MODELS``). Default ``"mobilenetv2"``.
        num_classes: Classes the model predicts; every client's labels must
            be below it. Default 10 (CIFAR-10).
        local_epochs: Local epochs per round on each client. Default 1.
        batch_size: Local training batch size. 0 (the default) = the
            model's recipe (``pollen.models.registry.Recipe``: 32 for ``mobilenetv2``,
            64 for ``fastnet``).
        learning_rate: Peak learning rate of the local optimizer. 0 (the
            default) = the model's recipe (0.001 for ``mobilenetv2``, 0.1 for
            ``fastnet``).
        lr_schedule: ``"cosine"``: the local learning rate decays from
            ``learning_rate`` to 0 over the run's local steps (all rounds);
            ``"onecycle"``: linear warm-up, then linear decay to 0;
            ``"constant"``: it stays; ``"auto"`` (the default): the model's
            recipe (cosine for ``mobilenetv2``, onecycle for ``fastnet``).
            The three values left to the recipe are resolved when the config
            is built, so every process sees the concrete values.
        partition: How the dataset is split among clients in simulation or
            with ``--partition-id``: ``"iid"`` or ``"dirichlet"``. Default iid.
        alpha: Concentration of the Dirichlet label skew (smaller = more
            skewed). Used only with ``partition="dirichlet"``. Default 0.5.
        seed: Seed for partitioning, shuffling, model initialisation and the
            clients each round samples (:func:`pollen.server.sampling.seeded_sampling`).
        data_dir: Dataset location for simulated clients ("" = CIFAR-10 from the
            cache, downloaded once). A client's own ``data-dir`` node config wins;
            a deployed client never reads this one (docs/security.md).
        out: Absolute path of the run folder the server writes. "" = the
            server app picks ``./runs/<timestamp>``.
        min_clients: Clients that must be connected before a round starts,
            and the fewest replies a round accepts. Default 2.
        fraction_train: Fraction of connected clients sampled per round.
        strategy: Aggregation strategy name (see ``pollen.server.strategies``).
        server_lr: Server learning rate of ``fedavgm`` and the adaptive
            strategies (``fedadam``, ``fedyogi``, ``fedadagrad``): how far the
            server moves along the clients' average update. Default 1.0.
        server_momentum: Server momentum of ``fedavgm``. Default 0.0.
        server_eval: Evaluate the global model on a central test set after
            every round (the server then builds the model). Default True.
        server_data_dir: Dataset whose test split the server evaluates on
            ("" = ``data-dir``'s, as a plain ``flwr run .`` expects; both "" =
            CIFAR-10 from the cache).
        whiten: The client that provides the initial weights starts the
            model's first convolution from whitened patches of its images
            (models with a ``whiten`` layer: ``fastnet``, ``mobilenetv2``;
            never under DP or SecAgg+). False = Keras's random initialisation
            throughout. Default True.
        tta: Evaluate (server and clients) with the model's test-time
            augmentation, for models that have one (``fastnet``: averaged
            probabilities of each image and its mirror image; a second
            forward pass). False = one forward pass. Default True.
        bn_calibration_examples: Local training examples each client runs
            forward (no weight update) to re-estimate BatchNorm statistics of
            the aggregated model before it is evaluated; 0 turns it off.
        round_timeout: Seconds the server waits for replies in one round.
        client_threads: Intra-op threads (torch or TensorFlow) per client process; 0 = the
            machine's cores divided among the clients sharing it.
        keras_verbose: Keras ``fit`` verbosity on clients (0, 1 or 2).
        target_accuracy: Stop early once the server's test accuracy reaches
            this value (0 = run all rounds).
        max_update_norm: The server rejects a client's update whose L2
            distance from the global weights it was sent (all floating-point
            arrays together) exceeds this; 0 = no bound. Default 3000: a
            generous bound, about 10x what honest training produces. Measured:
            the reference MobileNetV2 after 3 rounds of the reference run is at
            distance 311 from its initialisation (BatchNorm moving statistics
            311, trained weights 15), so no honest round of it gets near 3000,
            while an update scaled x1000 (a model-replacement attack) lands
            far above; the small CNN's honest 1-epoch update on the test data
            is about 4. NaN/inf values, wrong shapes and dtypes are rejected
            whatever the bound.
        fault: Fault injection for tests and robustness experiments only:
            ``"KIND@IDS"`` (several separated by spaces) makes the clients
            whose ``partition-id`` is in the comma-separated IDS misbehave
            (``KIND`` one of ``nan``, ``scale``, ``signflip``, ``noise``,
            ``arch``; see ``pollen.client.app.FAULTS``).
            "" (the default) = every client is honest.
        resume: Continue the run in ``out`` from its checkpoint (the round
            after the last completed one) instead of starting a new run.
        proximal_mu: Weight mu of FedProx's proximal term
            ``mu/2 * ||w - w_global||^2`` that clients add to their loss
            (``strategy="fedprox"`` only). Default 0.01.
        trim_beta: Fraction cut from each end of every coordinate by
            ``trimmedmean`` before averaging. Default 0.2.
        num_malicious_nodes: Malicious clients ``krum``, ``multikrum`` and
            ``bulyan`` assume to be present (f). Default 0. Bulyan needs at
            least 4f + 3 clients per round, Krum 2f + 3.
        num_nodes_to_select: Updates ``multikrum`` averages (m). Default 1
            (then it equals Krum).
        malicious: Attack harness for simulations: the clients with
            partition ids ``0..malicious-1`` send poisoned updates (see
            ``attack``). Default 0 = no attack.
        attack: What malicious clients send: ``signflip``, ``noise`` or
            ``scale`` (see ``pollen.client.app.FAULTS``). Default signflip.
        secagg: Secure aggregation with Flower's SecAgg+: the server learns
            only the weighted sum of the sampled clients' updates, never one
            client's update. Works with ``strategy="fedavg"`` only. Default off.
        secagg_num_shares: SecAgg+ shares of each client's secret (its
            neighbours): a fraction (<= 1) of the sampled clients or an integer
            count (> 2). Default 1.0 = every sampled client.
        secagg_reconstruction_threshold: Shares needed to reconstruct a
            dropped client's mask: a fraction (<= 1) of ``secagg-num-shares``
            or an integer count. Default 0.67. Up to ``shares - threshold``
            clients may drop out of a round after training starts; a server
            colluding with fewer than ``threshold`` clients learns nothing
            about one client's update.
        secagg_clipping_range: SecAgg+ clips every value of an update to
            ``[-range, range]`` before quantizing it to 2**22 levels.
            Default 8.0.
        dp: Differential privacy: ``""`` (off, the default), ``"client"``
            (client-level: Flower's server-side fixed clipping, each update's
            L2 norm clipped to ``dp-clip``, Gaussian noise of std ``dp-noise *
            dp-clip / clients`` added to the average, an RDP accountant) or
            ``"example"`` (example-level: DP-SGD on every client,
            ``pollen.training.dp_sgd``; ``dp-clip`` is then the per-example
            clipping norm). ``true``/``false`` (older configs) mean
            ``"client"``/``""``.
        dp_noise: Noise multiplier z (noise std / clipping norm). Default 0:
            the smallest z that keeps the whole run within ``dp-epsilon``.
            With both set, the run refuses to start if z spends more than
            ``dp-epsilon``.
        dp_clip: L2 clipping norm of one client's update. Default 1.0.
        dp_delta: The delta of the reported (epsilon, delta). Default 1e-5.
        dp_epsilon: Privacy budget epsilon for the whole run (0 = none). The
            run refuses to start if its noise cannot keep it within budget.
        client_sampling: How client-level DP samples clients: ``"seeded"``
            (the default: a fixed-size sample drawn from ``seed``, no
            amplification credited) or ``"poisson"`` (each client joins a round
            with probability ``fraction-train``, from the OS's randomness;
            amplification credited; ``dp = "client"`` only).
        compress: How clients send their updates (:mod:`pollen.compress`):
            ``none``, ``fp16``, ``int8`` or ``topk:K``, as the change to the
            weights received, with error feedback. Not with ``secagg``.
        compress_down: How the server sends the weights: ``none``, ``fp16``
            or ``int8``. Not with ``secagg``.
        image_size: ``"HxW"`` (or ``"N"`` for N x N) every image is resized to
            and every model is built for, each side 32 to 1024. ``"auto"`` (the
            default) is resolved when the config is built (:func:`auto_image_size`):
            32x32 when the data is CIFAR-10 (``data-dir`` and
            ``server-data-dir`` both "" or a CIFAR-10 archive/folder), else the
            model's own size (``ModelSpec.image_size``: 96x96 for
            ``mobilenetv2``, 32x32 for ``cnn`` and ``fastnet``). After that it
            is always ``"HxW"``; :attr:`image_hw` is it as a tuple.
        mlflow_uri: MLflow tracking URI (``file:``, ``sqlite:``, ``http(s):``)
            the server logs the run's parameters, per-round metrics and final
            model to (:mod:`pollen.server.tracking`); "" (the default): none.
        weights: Pretrained starting weights (``pollen.models.pretrained``):
            ``"imagenet"`` (the model's ``keras.applications`` ImageNet
            weights: ``mobilenetv2``, ``efficientnetb0``) or the absolute path of
            a ``.keras``/``.h5`` model or ``.weights.h5``/``.h5`` weights file.
            Only the server reads it; clients receive the loaded weights as
            round 1's global model. "" (the default): random initialisation.
            With weights, ``whiten`` is off.
        freeze_rounds: Rounds, from round 1, that train only the classifier
            (the pretrained backbone frozen, see ``pollen.training.finetune``).
            Default 0: every layer trains from round 1 (measured better than
            1, docs/images.md). Needs ``weights``.
        fine_tune_lr: Peak learning rate once the pretrained backbone trains
            (after ``freeze-rounds``). 0 (the default) = ``learning-rate``
            times :data:`FINE_TUNE_LR_FACTOR`; resolved when the config is built.
    """

    num_rounds: int = 3
    model: str = "mobilenetv2"
    num_classes: int = 10
    local_epochs: int = 1
    batch_size: int = 0
    learning_rate: float = 0.0
    lr_schedule: str = "auto"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 42
    data_dir: str = ""
    out: str = ""
    min_clients: int = 2
    fraction_train: float = 1.0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_eval: bool = True
    server_data_dir: str = ""
    whiten: bool = True
    tta: bool = True
    bn_calibration_examples: int = 2000
    round_timeout: float = 3600.0
    client_threads: int = 0
    keras_verbose: int = 2
    target_accuracy: float = 0.0
    max_update_norm: float = 3000.0
    fault: str = ""
    resume: bool = False
    proximal_mu: float = 0.01
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 1
    malicious: int = 0
    attack: str = "signflip"
    secagg: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    dp: str = ""
    dp_noise: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    dp_epsilon: float = 0.0
    client_sampling: str = "seeded"
    compress: str = "none"
    compress_down: str = "none"
    image_size: str = "auto"
    mlflow_uri: str = ""
    weights: str = ""
    freeze_rounds: int = 0
    fine_tune_lr: float = 0.0

    def __post_init__(self) -> None:
        """Resolve the settings left to auto: the recipe's three and ``image-size``."""
        recipe = MODELS[self.model].recipe if self.model in MODELS else Recipe()
        for name, auto in (("batch_size", 0), ("learning_rate", 0.0), ("lr_schedule", "auto")):
            if getattr(self, name) == auto:
                object.__setattr__(self, name, getattr(recipe, name))
        size = parse_image_size(str(self.image_size))
        if size is None:
            size = auto_image_size(self.model, self.data_dir or self.server_data_dir)
        object.__setattr__(self, "image_size", f"{size[0]}x{size[1]}")
        if self.fine_tune_lr == 0.0:
            object.__setattr__(self, "fine_tune_lr", self.learning_rate * FINE_TUNE_LR_FACTOR)
        object.__setattr__(self, "dp", DP_ALIASES.get(str(self.dp).strip().lower(), self.dp))
        if self.weights:  # the first convolution comes from the file, not from whitening
            object.__setattr__(self, "whiten", False)

    @property
    def image_hw(self) -> tuple[int, int]:
        """``image-size`` as ``(height, width)``: the images' size and the models' input."""
        height, _, width = self.image_size.partition("x")
        return int(height), int(width)

    @classmethod
    def declared_defaults(cls) -> dict[str, Any]:
        """Field defaults as declared, kebab-case (0 / ``"auto"`` left to the recipe).

        These are the values of ``[tool.flwr.app.config]``; ``RunConfig()``
        holds them resolved for the default model.
        """
        return {f.name.replace("_", "-"): f.default for f in fields(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a validated config from Flower's kebab-case run config.

        Unknown keys are ignored (Flower apps may carry extra keys); known keys
        are converted to the field's type.

        Raises:
            PollenError: A value has the wrong type or is out of range.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in values:
                continue
            kwargs[f.name] = _convert(key, values[key], type(getattr(cls(), f.name)))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def fault_spec(self) -> str:
        """``fault`` plus the attack harness as one ``"KIND@IDS ..."`` spec.

        ``malicious=K`` with ``attack=A`` adds ``"A@0,...,K-1"``; an explicit
        ``fault`` for the same partition wins (it comes first).
        """
        specs = self.fault.split()
        if self.malicious:
            specs.append(f"{self.attack}@" + ",".join(str(i) for i in range(self.malicious)))
        return " ".join(specs)

    def to_mapping(self) -> dict[str, Any]:
        """Return the kebab-case mapping Flower's run config uses."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` applied."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and names.

        Raises:
            PollenError: The first problem found, phrased for the user.
        """
        checks = [
            (self.num_rounds >= 1, "rounds must be at least 1"),
            (0 <= self.seed < 2**32, "seed must be between 0 and 4294967295"),
            (self.num_classes >= 2, "num-classes must be at least 2"),
            (self.local_epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.learning_rate > 0, "learning rate must be positive"),
            (self.alpha > 0, "alpha must be positive"),
            (self.min_clients >= 1, "min-clients must be at least 1"),
            (self.server_lr > 0, "server-lr must be positive"),
            (0 <= self.server_momentum < 1, "server-momentum must be in [0, 1)"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.bn_calibration_examples >= 0, "bn-calibration-examples must be >= 0"),
            (self.round_timeout > 0, "round-timeout must be positive"),
            (self.client_threads >= 0, "client-threads must be >= 0"),
            (self.keras_verbose in (0, 1, 2), "keras-verbose must be 0, 1 or 2"),
            (0 <= self.target_accuracy <= 1, "target accuracy must be in [0, 1]"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
            (self.proximal_mu >= 0, "proximal-mu must be >= 0"),
            (0 <= self.trim_beta < 0.5, "trim-beta must be in [0, 0.5)"),
            (self.num_malicious_nodes >= 0, "num-malicious-nodes must be >= 0"),
            (self.num_nodes_to_select >= 1, "num-nodes-to-select must be at least 1"),
            (self.malicious >= 0, "malicious must be >= 0"),
            (self.secagg_num_shares > 0, "secagg-num-shares must be positive"),
            (
                self.secagg_reconstruction_threshold > 0,
                "secagg-reconstruction-threshold must be positive",
            ),
            (self.secagg_clipping_range > 0, "secagg-clipping-range must be positive"),
            (self.dp in DP_LEVELS, "dp must be client or example (or empty: off)"),
            (self.dp_noise >= 0, "dp-noise must be >= 0"),
            (self.dp_clip > 0, "dp-clip must be positive"),
            (0 < self.dp_delta < 1, "dp-delta must be in (0, 1)"),
            (self.dp_epsilon >= 0, "dp-epsilon must be >= 0 (0 = no budget)"),
            (
                self.client_sampling in ("seeded", "poisson"),
                "client-sampling must be seeded or poisson",
            ),
            (self.freeze_rounds >= 0, "freeze-rounds must be >= 0"),
            (self.fine_tune_lr > 0, "fine-tune-lr must be positive"),
            (
                self.weights or not self.freeze_rounds,
                "freeze-rounds needs --weights (it freezes a pretrained backbone)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PollenError(f"Invalid run configuration: {message}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PollenError(
                f"Unknown learning-rate schedule {self.lr_schedule!r}: use one of "
                f"{', '.join(LR_SCHEDULES)}."
            )
        if self.partition not in PARTITION_METHODS:
            raise PollenError(
                f"Unknown partition method {self.partition!r}: use one of "
                f"{', '.join(PARTITION_METHODS)}."
            )
        if self.model not in MODELS:
            raise PollenError(
                f"Unknown model {self.model!r}: the registry has {', '.join(sorted(MODELS))}. "
                "Add a model as one file in pollen/models/ (docs/extending.md)."
            )
        for spec in self.fault.split():
            kind, at, ids = spec.partition("@")
            ids_ok = at and all(i.strip().isdigit() for i in ids.split(","))
            if kind not in FAULT_KINDS or not ids_ok:
                raise PollenError(
                    f"Invalid fault {spec!r}: write KIND@IDS with KIND one of "
                    f"{', '.join(FAULT_KINDS)} and IDS comma-separated partition ids, for "
                    "example nan@1 or 'nan@1 arch@2' (fault injection is for tests and "
                    "experiments only)."
                )
        if self.attack not in ATTACK_KINDS:
            raise PollenError(
                f"Unknown attack {self.attack!r}: use one of {', '.join(ATTACK_KINDS)}."
            )
        check_compression(self)
        check_weights(self)


def parse_image_size(text: str) -> tuple[int, int] | None:
    """``"N"`` or ``"HxW"`` as ``(height, width)``; ``None`` for ``"auto"`` (or "").

    Raises:
        PollenError: Not a size, or a side outside 32..1024.
    """
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    height, sep, width = text.partition("x")
    sides = (height, width if sep else height)
    if not all(s.strip().isdigit() for s in sides):
        raise PollenError(
            f"Invalid image size {text!r}: write N (N x N pixels, e.g. 96) or HxW (e.g. "
            "96x128), or auto."
        )
    size = (int(sides[0]), int(sides[1]))
    if not all(MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in size):
        raise PollenError(
            f"Invalid image size {text!r}: each side must be between {MIN_IMAGE_SIDE} and "
            f"{MAX_IMAGE_SIDE} pixels (the models need at least {MIN_IMAGE_SIDE}; larger "
            "images need more memory than one client has)."
        )
    return size


def auto_image_size(model: str, data_dir: str) -> tuple[int, int]:
    """What ``image-size = "auto"`` means for ``model`` on the data at ``data_dir``.

    32x32 for CIFAR-10 (``data_dir`` "" or a CIFAR-10 archive or folder: its images are
    32x32, nothing is resized); otherwise the model's own size (``ModelSpec.image_size``),
    but never larger than the images themselves (the first training image's smaller side,
    at least 32): upsampling thumbnails costs compute and adds nothing, so an image folder
    of 32x32 images (such as the JPEG copy of CIFAR-10) stays at 32x32.
    """
    if not data_dir or is_cifar10(data_dir):
        return CIFAR10_IMAGE_SIZE
    side = MODELS[model].image_size if model in MODELS else CIFAR10_IMAGE_SIZE[0]
    native = native_image_size(data_dir)
    if native is not None:
        side = max(CIFAR10_IMAGE_SIZE[0], min(side, *native))
    return side, side


def _convert(key: str, value: Any, target: type) -> Any:
    """Convert a TOML/CLI value to ``target``, or raise a PollenError."""
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return target(value)
    except (TypeError, ValueError):
        raise PollenError(
            f"Invalid run configuration: {key}={value!r} is not a valid {target.__name__}."
        ) from None


def check_weights(cfg: RunConfig) -> None:
    """Refuse a ``weights`` that is neither ``imagenet`` nor a Keras file name.

    Only the form is checked: clients validate the run config too, and the
    file exists on the server only (``pollen.models.pretrained`` opens it).
    ``imagenet`` needs a model that has ImageNet weights.
    """
    if not cfg.weights:
        return
    if cfg.weights == "imagenet":
        spec = MODELS[cfg.model]
        if spec.imagenet is None:
            have = ", ".join(n for n, s in MODELS.items() if s.imagenet is not None)
            raise PollenError(
                f"Model {cfg.model!r} has no ImageNet weights: use --model {have}, or give "
                "--weights the path of a .keras/.h5 file."
            )
        return
    if not cfg.weights.endswith(WEIGHT_SUFFIXES):
        raise PollenError(
            f"Invalid weights {cfg.weights!r}: give imagenet, or the path of a .keras or .h5 "
            "model, or of a .weights.h5 / .h5 weights file."
        )


def check_compression(cfg: RunConfig) -> None:
    """Refuse an unknown ``compress``/``compress-down``, and either with ``secagg``.

    Raises:
        PollenError: The first problem found, phrased for the user.
    """
    codecs = (parse_codec(cfg.compress), parse_codec(cfg.compress_down, downlink=True))
    if cfg.secagg and codecs != (None, None):
        raise PollenError(
            "--compress and --compress-down cannot be combined with --secagg: under "
            "SecAgg+ each client masks its whole update, quantized by SecAgg+ itself to "
            "integers within --secagg-clipping-range, with dense random masks, and the "
            "server only ever sees the masked sum, so it could neither decode one client's "
            "compressed update nor save bytes on a sparse one (the masks are dense). Drop "
            "--compress/--compress-down, or --secagg."
        )
