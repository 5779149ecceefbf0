"""Target models: timm ViT and MLP-Mixer built from a JSON-able description, plus train/evaluate
helpers.

A `ModelSpec` is stored in the metadata of every checkpoint and quantized file, so a file alone says
how to rebuild its model and which data evaluates it. The CPU profile uses timm's
`VisionTransformer` and `MlpMixer` classes at small widths (`arch` names the class); the paper
profile uses timm's registered names (`vit_tiny_patch16_224`, ...; `arch` names the model and
`kwargs` go to `timm.create_model`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn as nn
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ..core.io import CorruptFileError, metadata_json, read_safetensors, save_safetensors
from ..quant import qwt
from ..quant.fileformat import FORMAT_NAME, load_quantized
from ..quant.quantizer import QuantSpec, fake_quantize, is_quantized_weight

TIMM_CLASSES = {"VisionTransformer": VisionTransformer, "MlpMixer": MlpMixer}


@dataclass(frozen=True)
class ModelSpec:
    """How to build and feed a target model: a timm class or registered name, its kwargs, its data,
    and the input normalisation its weights expect (`norm` = (mean, std); None: the dataset's own
    statistics, as for every model trained here; timm's pretrained ViTs and Mixers expect
    0.5/0.5)."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    dataset: str = "fashion_mnist"
    norm: tuple | None = None

    def __post_init__(self):
        if self.norm is not None:  # JSON gives lists; keep tuples so specs stay hashable cache keys
            object.__setattr__(self, "norm", tuple(tuple(float(x) for x in v) for v in self.norm))

    @property
    def img_size(self) -> int:
        """Input side in pixels: the kwargs' `img_size`, else timm's default of 224."""
        return int(self.kwargs.get("img_size", 224))

    def to_dict(self) -> dict:
        d = asdict(self)
        # the dataset's statistics: files written before `norm` existed keep their keys
        if d["norm"] is None:
            del d["norm"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        missing = {"arch"} - d.keys()
        if missing:
            raise ValueError(
                f"model description {d!r} lacks {sorted(missing)}; "
                "expected keys arch, kwargs, dataset"
            )
        return cls(
            d["arch"], dict(d.get("kwargs", {})), d.get("dataset", "fashion_mnist"), d.get("norm")
        )


def build_model(spec: ModelSpec | dict) -> nn.Module:
    """Instantiate the timm model a spec describes (random init unless kwargs ask timm for
    pretrained)."""
    spec = ModelSpec.from_dict(spec) if isinstance(spec, dict) else spec
    if spec.arch in TIMM_CLASSES:
        return TIMM_CLASSES[spec.arch](**spec.kwargs)
    if spec.arch not in timm.list_models():
        raise ValueError(
            f"unknown architecture {spec.arch!r}: use one of {sorted(TIMM_CLASSES)} "
            "or a timm model name"
        )
    return timm.create_model(spec.arch, **spec.kwargs)


def pretrained_weights(
    spec: ModelSpec, file: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Pretrained weights to start the tasks from: timm's for a registered model name (from the
    Hugging Face hub, or from `file` for offline use), or a timm class's from `file`.

    `file` is a safetensors state_dict of that model (pickled .pth files are never loaded). For a
    model name, timm reads it in place of the hub and drops a head whose class count differs from
    `spec`'s.
    """
    if file is not None:
        check_pretrained_file(file)
    if spec.arch in TIMM_CLASSES:
        if file is None:
            raise ValueError(
                f"{spec.arch} is a timm class without published weights: give its archs entry a "
                f"`pretrained_file`, use a model name such as vit_tiny_patch16_224, "
                f"or a `pretrain` run"
            )
        return state_dict_of(
            load_weights(build_model(spec), read_safetensors(file)[0], f"pretrained_file {file}")
        )
    overlay = {"file": str(file)} if file is not None else None
    try:
        model = timm.create_model(
            spec.arch, pretrained=True, pretrained_cfg_overlay=overlay, **spec.kwargs
        )
    # no network, hub refusal, a file of another model: all reported with the fix
    except Exception as e:
        raise RuntimeError(
            f"timm could not load pretrained weights for {spec.arch} ({type(e).__name__}: {e}). "
            f"Without internet access: run `timm.create_model({spec.arch!r}, pretrained=True)` "
            f"on a machine with it and copy ~/.cache/huggingface here, or save that model's "
            f"state_dict with safetensors and set `pretrained_file` in the profile's archs entry."
        ) from e
    return state_dict_of(model)


def check_pretrained_file(file: str | os.PathLike) -> None:
    """Refuse a `pretrained_file` that is missing or not safetensors, saying how to fix the
    profile."""
    if not str(file).endswith(".safetensors"):
        raise ValueError(
            f"pretrained_file {file} is not a .safetensors file; pickles are never loaded: "
            "convert it with "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), 'x.safetensors')"
        )
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"pretrained weights file {file} does not exist; fix `pretrained_file` in the "
            f"profile's archs entry or remove it to download from the hub"
        )


def pretrained_norm(arch: str) -> tuple | None:
    """(mean, std) timm's default pretrained weights of model name `arch` were trained with (None
    for a class)."""
    cfg = None if arch in TIMM_CLASSES else timm.get_pretrained_cfg(arch)
    return None if cfg is None else (tuple(cfg.mean), tuple(cfg.std))


def resolve_device(name: str | None) -> str:
    """A torch device for a profile's `device`: "cpu", "cuda[:i]", or "auto" (CUDA when
    available)."""
    name = name or "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"the profile asks for device {name!r} but torch sees no CUDA GPU here; "
            f"set `device: cpu` (or `auto`) in the profile, or run on a GPU machine"
        )
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    return str(torch.device(name))


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """Load a state_dict strictly, explaining any mismatch with the architecture before touching the
    model."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the {type(model).__name__} architecture:"]
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong),
        ):
            if items:
                lines.append(
                    f"  {label} ({len(items)}): {', '.join(items[:5])}"
                    f"{' ...' if len(items) > 5 else ''}"
                )
        lines.append(
            "  Check that the file was written for this model description (ModelSpec) and profile."
        )
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    return model


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 CPU copy of a model's weights, safe to keep while training continues."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}


def progress(iterable=None, **kw):
    """tqdm progress bar; `TQDM_DISABLE=1` (set by the tests) turns it off."""
    return tqdm(iterable, disable=bool(os.environ.get("TQDM_DISABLE")), **kw)


def fit(
    model: nn.Module,
    loader: Iterable,
    epochs: float,
    lr: float,
    weight_decay: float = 0.05,
    params: Iterable[nn.Parameter] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    device: str = "cpu",
    desc: str = "train",
    quant: QuantSpec | None = None,
) -> list[float]:
    """Train with AdamW and a cosine schedule for `epochs` (fractions allowed) over `loader`.

    `params` restricts training to those parameters (the head-only transfer task freezes the rest);
    `on_step(step, model)` runs after every optimizer step, which is how checkpoints are collected.
    `quant` makes it quantization-aware training: the forward pass sees every quantized weight
    fake-quantized to that spec (straight-through gradient), the optimizer updates the float
    weights. Returns the per-step training losses.
    """
    params = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    total = max(1, round(epochs * len(loader)))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    model.to(device).train()
    losses, step = [], 0
    with progress(total=total, desc=desc) as bar:
        while step < total:
            for x, y in loader:
                loss = nn.functional.cross_entropy(
                    _forward(model, x.to(device), quant), y.to(device)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if on_step is not None:
                    on_step(step, model)
                if step >= total:
                    break
    return losses


def _forward(model: nn.Module, x: torch.Tensor, quant: QuantSpec | None) -> torch.Tensor:
    """model(x), with the quantized weights fake-quantized to `quant` when it is given (QAT)."""
    if quant is None:
        return model(x)
    weights = {
        n: fake_quantize(p, quant) if is_quantized_weight(n, p) else p
        for n, p in model.named_parameters()
    }
    return torch.func.functional_call(model, weights, (x,))


def save_checkpoint(
    path, sd: dict[str, torch.Tensor], spec: ModelSpec, meta: dict | None = None
) -> None:
    """A full-precision checkpoint: safetensors weights + the ModelSpec (and run facts) in the
    metadata."""
    save_safetensors(
        sd,
        path,
        {"format": "qg-checkpoint", "model": spec.to_json(), "meta": json.dumps(meta or {})},
    )


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], ModelSpec, dict]:
    """Read a checkpoint written by `save_checkpoint`: (state_dict, ModelSpec, run metadata)."""
    sd, metadata = read_safetensors(path)
    if "model" not in metadata:
        raise CorruptFileError(
            f"{path} has no model description in its metadata; "
            "write it with qg.targets.models.save_checkpoint"
        )
    return (
        sd,
        ModelSpec.from_dict(metadata_json(path, metadata, "model")),
        metadata_json(path, metadata, "meta", "{}"),
    )


MAX_MODEL_PARAMS = 2_000_000_000  # 8 GB of float32; the paper's largest target (ViT-Base) has 86M


def load_model_description(path) -> ModelSpec:
    """The ModelSpec a checkpoint or quantized model file declares, from its header alone."""
    metadata = read_safetensors(path, tensors=False)[1]
    if metadata.get("format") == FORMAT_NAME:
        model = metadata_json(path, metadata, "meta", "{}").get("model")
        if model is None:
            raise CorruptFileError(
                f"{path} has no model description; write it with a `model` entry in its meta"
            )
        return ModelSpec.from_dict(model)
    return ModelSpec.from_dict(metadata_json(path, metadata, "model"))


def check_model_size(spec: ModelSpec, limit: int = MAX_MODEL_PARAMS) -> ModelSpec:
    """Refuse a model description (from a file a user hands us) larger than `limit` parameters,
    counted on PyTorch's meta device, before anything is allocated."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(spec).parameters())
    if n > limit:
        raise ValueError(
            f"the model description ({spec.arch}, {spec.kwargs}) has {n:,} parameters, over the "
            f"limit of {limit:,}: the file's description is damaged or not a model qg trains"
        )
    return spec


def load_model_file(path) -> tuple[dict[str, torch.Tensor], ModelSpec, dict]:
    """A checkpoint or a quantized model file as (float state_dict, ModelSpec, metadata): what
    evaluation needs."""
    _, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT_NAME:
        sd, _, meta = load_quantized(path)
        if "model" not in meta:
            raise CorruptFileError(
                f"{path} has no model description; write it with a `model` entry in its meta"
            )
        return sd, ModelSpec.from_dict(meta["model"]), meta
    return load_checkpoint(path)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 predicted classes, labels) over every batch of `loader`."""
    model.to(device).eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(-1).cpu())
        labels.append(torch.as_tensor(y))
    if not preds:
        raise ValueError("evaluate got an empty loader")
    return torch.cat(preds), torch.cat(labels)


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of predicted classes against labels."""
    return 100.0 * int((pred == labels).sum()) / len(labels)


def evaluate(model: nn.Module, loader: Iterable, device: str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    return top1(*predict(model, loader, device))


def build_from(
    spec: ModelSpec, sd: dict[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """The model `spec` with the float weights `sd` of a checkpoint or quantized file loaded
    (strictly), and the QwT compensations the file carries, if any, attached (`qg.quant.qwt`)."""
    own, compensation = qwt.split(sd)
    return qwt.attach(load_weights(build_model(spec), own, source), compensation, source)


def accuracy(spec: ModelSpec, sd: dict[str, torch.Tensor], test, device: str = "cpu") -> float:
    """Top-1 accuracy (%) of weights `sd` for model `spec` on the batches of `test` (see
    `qg.targets.data.batches`)."""
    return evaluate(build_from(spec, sd), test, device)
