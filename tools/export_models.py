"""Export the models of models/exports.toml to ONNX, reproducibly, into the cache.

Real architectures with seeded random weights (eval mode, no download): torchvision's ResNet-50,
MobileNetV2, EfficientNet-B0, RegNetY-400MF and ViT-B/16, BERT-base, and a wide corpus of small
(2-4 layer) models built from transformers configs and torchvision constructors (GPT-2 and Llama
with past key/values, BERT with an attention mask, T5's encoder, ViT, ConvNeXt, SSDlite and Mask
R-CNN detectors with their If/Loop/NMS post-processing, LSTM and GRU models), each through BOTH torch exporters:
the legacy TorchScript one (dynamo=False) at opset 17 with constant folding, and torch.export's
(dynamo=True) at opset 20 with its default onnxscript optimization. Two scikit-learn pipelines go
through skl2onnx. Every parameter is randomized (see _randomize_parameters): a fresh model's exact
zero biases and unit norm scales are what trained models do not have. The output is
`<cache>/exports/<name>.onnx`; the cache is ONNXSLIM_CACHE when set, else `.cache/` at the
repository root. A model/exporter combination that cannot be exported is in the manifest with
`skipped = "reason"`, and is neither exported nor benched.

torch and torchvision are a 5.5 GB install, so they live in a virtualenv of their own,
`<cache>/export-venv`, which this script creates the first time with Python 3.11 (the release pip
finds torch==2.14.1 and torchvision==0.29.1 for on this machine's disk) and then re-runs itself in.
The script itself starts under any Python 3.10+ with only the standard library.

As a module::

    from tools.export_models import ensure_exported, export_path
    path = ensure_exported("resnet50")      # exports it (and creates the venv) if needed

As a script::

    python tools/export_models.py               # export all that are missing: name, path, size, nodes
    python tools/export_models.py vit-b16 --force
    python tools/export_models.py --list        # what the manifest holds and what is exported
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    try:
        import tomli as tomllib
    except ModuleNotFoundError:  # checked again, with advice, when the manifest is read
        tomllib = None

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "models" / "exports.toml"

# What the export venv holds. The manifest records the same torch/torchvision/transformers versions
# per model; the export checks that the two agree, so a bump has to touch both.
VENV_PYTHON = (3, 11)
VENV_REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==4.57.6",
    "onnx==1.23.1",
    # torch.onnx.export(dynamo=True) translates with onnxscript and optimizes with it.
    "onnxscript==0.7.2",
    "onnx-ir==1.1.0",
    "scikit-learn==1.6.1",
    "skl2onnx==1.20.0",
)
# The exporters a manifest entry can name, with the package whose version it pins for them.
EXPORTERS = {"torchscript": "torch", "dynamo": "torch", "skl2onnx": "skl2onnx"}
PINNED_PACKAGES = ("torch", "torchvision", "transformers", "onnxscript", "scikit-learn", "skl2onnx")
DEFAULT_OPSET = 17
SEED = 0
# The standard deviation every weight, bias and norm offset is drawn with (GPT-2's and BERT's own
# initializer range); norm scales are drawn around 1 with NORM_SCALE_STD (see _randomize_parameters).
PARAMETER_STD = 0.02
NORM_SCALE_STD = 0.1

_MARKER = "onnxslim-requirements.txt"  # written into the venv once its install has succeeded


class ExportError(Exception):
    """A model could not be exported, or the export environment could not be set up."""


def cache_dir() -> Path:
    """The cache root: ONNXSLIM_CACHE if set, else .cache/ at the repository root."""
    configured = os.environ.get("ONNXSLIM_CACHE")
    return Path(configured).expanduser() if configured else REPO_ROOT / ".cache"


def venv_dir() -> Path:
    return cache_dir() / "export-venv"


def export_path(name: str) -> Path:
    """Where model `name` is (or will be) exported: <cache>/exports/<name>.onnx."""
    _entry(name, allow_skipped=True)
    return cache_dir() / "exports" / f"{name}.onnx"


def ensure_exported(name: str, force: bool = False) -> Path:
    """Export model `name` unless it already is (or `force`); return its path.

    From outside the export venv this creates the venv if needed and runs the export there.
    """
    entry = _entry(name)  # refuses a skipped model before any venv is made for it
    target = export_path(name)
    if target.is_file() and not force:
        return target
    if _in_export_venv():
        _export(name, entry, target)
        return target
    python = ensure_venv()
    command = [str(python), str(Path(__file__).resolve()), name] + (["--force"] if force else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExportError(f"exporting {name} in {venv_dir()} failed: {reason}")
    return target


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, dict[str, Any]]:
    """Model name -> manifest entry, in the order of the manifest file."""
    if tomllib is None:
        raise ExportError("reading the manifest on Python 3.10 needs tomli: pip install tomli")
    try:
        with open(path, "rb") as f:
            models = tomllib.load(f).get("models", {})
    except OSError as e:
        raise ExportError(f"cannot read the export manifest {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"the export manifest {path} is not valid TOML: {e}") from e
    for name, entry in models.items():
        check_entry(name, entry)
    return models


def check_entry(name: str, entry: dict[str, Any]) -> None:
    """Refuse a manifest entry this script could not export as it says (ExportError)."""
    recipe = recipe_name(name, entry)
    if recipe not in _RECIPES:
        raise ExportError(f"manifest entry {name!r} names recipe {recipe!r}, which {Path(__file__).name} lacks")
    exporter = entry.get("exporter", "torchscript")
    if exporter not in EXPORTERS:
        raise ExportError(f"manifest entry {name!r}: unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    if (exporter == "skl2onnx") != (recipe in _SKLEARN_RECIPES):
        raise ExportError(f"manifest entry {name!r}: recipe {recipe!r} cannot be exported with {exporter}")
    if not entry.get("verify_shapes") or EXPORTERS[exporter] not in entry:
        raise ExportError(f"manifest entry {name!r} lacks verify_shapes or {EXPORTERS[exporter]}")
    if not isinstance(entry.get("opset", DEFAULT_OPSET), int):
        raise ExportError(f"manifest entry {name!r}: opset must be an integer")
    skipped = entry.get("skipped")
    if skipped is not None and (not isinstance(skipped, str) or not skipped.strip() or "\n" in skipped):
        raise ExportError(f"manifest entry {name!r}: skipped must be a one-line reason")


def recipe_name(name: str, entry: dict[str, Any]) -> str:
    """The recipe that builds model `name`: its `recipe`, else its own name."""
    return entry.get("recipe", name)


def exportable(models: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the manifest's models that are exported (not `skipped`), in manifest order."""
    return [name for name, entry in models.items() if "skipped" not in entry]


def _entry(name: str, allow_skipped: bool = False) -> dict[str, Any]:
    models = load_manifest()
    if name not in models:
        raise ExportError(f"no model {name!r} in {MANIFEST_PATH.name}; known: {', '.join(models)}")
    if "skipped" in models[name] and not allow_skipped:
        raise ExportError(f"{name} is not exported: {models[name]['skipped']}")
    return models[name]


# --- the export venv ------------------------------------------------------------------------------

def _in_export_venv() -> bool:
    return Path(sys.prefix).resolve() == venv_dir().resolve()


def ensure_venv() -> Path:
    """Create <cache>/export-venv with VENV_REQUIREMENTS unless it is there; its python's path."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    wanted = "\n".join(VENV_REQUIREMENTS) + "\n"
    marker = venv / _MARKER
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    import fcntl  # two processes installing 5.5 GB into one venv at once would corrupt it

    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "export-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == wanted and python.exists():
            return python  # another process finished it while this one waited
        base_python = None if python.exists() else _base_python()
        print(f"export_models: installing torch and torchvision into {venv} "
              "(once; about 5.5 GB and a few minutes)", file=sys.stderr, flush=True)
        if base_python is not None:
            _run_logged("creating the venv", [base_python, "-m", "venv", str(venv)],
                        venv.parent / "export-venv.log")
        # pip installs over a half-finished venv as well, so an interrupted install resumes here.
        _run_logged("pip install " + " ".join(VENV_REQUIREMENTS),
                    [str(python), "-m", "pip", "install", "--disable-pip-version-check", *VENV_REQUIREMENTS],
                    venv / "install.log")
        marker.write_text(wanted)
    return python


def _base_python() -> str:
    """A Python 3.11 to build the venv from: pip finds torch 2.14.1 on this disk for 3.11 only."""
    if sys.version_info[:2] == VENV_PYTHON:
        return sys.executable
    name = "python{}.{}".format(*VENV_PYTHON)
    found = shutil.which(name)
    if found is None:
        raise ExportError(f"the export venv needs {name} (torch 2.14.1 lies on this machine's disk "
                          f"for Python 3.11 only); put {name} on PATH or run this script with it")
    return found


def _run_logged(what: str, command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["no message"]
        error_lines = [line for line in lines if line.startswith("ERROR")]
        raise ExportError(f"{what} failed: {(error_lines or lines)[-1].strip()} (full log: {log})")


# --- the recipes (run inside the venv) ------------------------------------------------------------

@dataclass
class ExportSpec:
    """What torch.onnx.export needs for one model."""

    model: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def _randomize_parameters(model: Any, std: float = PARAMETER_STD) -> None:
    """Draw every parameter of `model` afresh: weights, biases, embeddings and norm offsets from
    normal(0, std), norm scales from normal(1, NORM_SCALE_STD).

    Fresh models hold exact zeros (biases, norm offsets, torchvision's ViT head) and exact ones
    (norm scales) that trained models never have; a corpus built on them rewards rewrites that
    only remove such no-ops. Scales are drawn around 1 rather than 0 so that a stack of norms
    keeps the activations near unit size: scales near 0.02 shrink every block's contribution to a
    few hundredths, below what verification against the original could tell from an error.
    Buffers (BatchNorm statistics, rotary frequencies, position ids) are left as they are.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()  # BatchNorm2d, LayerNorm, LlamaRMSNorm, ...
            for name, parameter in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    parameter.normal_(1.0, NORM_SCALE_STD)
                else:
                    parameter.normal_(0.0, std)


def _torchvision_recipe(constructor: str) -> Callable[[dict[str, Any]], ExportSpec]:
    def build(entry: dict[str, Any]) -> ExportSpec:
        import torch
        import torchvision

        model = getattr(torchvision.models, constructor)(weights=None)
        shape = entry["verify_shapes"][0]["input"]
        _randomize_parameters(model)
        _set_batch_norm_statistics(model, lambda: model(torch.randn(8, *shape[1:])))
        image = torch.randn(shape)
        return ExportSpec(model, (image,), ["input"], ["output"],
                          {"input": {0: "batch"}, "output": {0: "batch"}})

    return build


def _set_batch_norm_statistics(model: Any, run_batch: Callable[[], Any], batches: int = 4) -> None:
    """Give every BatchNorm the running statistics of its own input on seeded noise images.

    Fresh running statistics (mean 0, variance 1) make an eval-mode BatchNorm almost an identity,
    and torchvision's fan-out initialization of depthwise convolutions then shrinks activations
    layer after layer: MobileNetV2's logits come out near 1e-9 and EfficientNet-B0's near 1e-14,
    below any absolute tolerance, so a broken graph would still verify. With the statistics of
    actual activations each BatchNorm renormalizes, as in a trained network, and the BatchNorms
    the exporter folds into Convs carry non-trivial scales and distinct biases. `run_batch` runs
    the model (or the part of it that holds the BatchNorms) on one batch of noise.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()  # dropout and stochastic depth off; only the BatchNorms gather statistics
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for _ in range(batches):
            run_batch()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _quiet_transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _traceable_masks(model: Any, entry: dict[str, Any]) -> None:
    """For the TorchScript exporter: build attention masks by broadcasting instead of torch.vmap.

    transformers' masking_utils makes the 4-D mask of its decoders with torch.vmap, which the
    tracer cannot follow (RuntimeError: unordered_map::at); its own export integration swaps in
    this vmap-free builder, with the same attention kernels. torch.export follows vmap, so the
    dynamo exports keep the stock one.
    """
    if entry.get("exporter", "torchscript") != "torchscript":
        return
    from transformers.integrations.executorch import sdpa_mask_without_vmap
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", sdpa_mask_without_vmap)
    ALL_ATTENTION_FUNCTIONS.register("sdpa_without_vmap", ALL_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = "sdpa_without_vmap"


def _padded_mask(batch: int, length: int, padded: int) -> Any:
    """An int64 attention mask of ones with the last `padded` positions of each row zero, so that
    no all-ones shortcut can be traced into the graph."""
    import torch

    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[:, length - padded:] = 0
    return mask


def _bert_base(entry: dict[str, Any]) -> ExportSpec:
    transformers = _quiet_transformers()
    # BertConfig's defaults are bert-base-uncased: vocabulary 30522, 12 layers, hidden size 768,
    # 12 heads, FFN 3072 with GELU. "eager" attention is the MatMul/Softmax form, not SDPA.
    return _bert(entry, transformers.BertConfig(attn_implementation="eager"))


def _bert_tiny(entry: dict[str, Any]) -> ExportSpec:
    transformers = _quiet_transformers()
    # transformers' default attention (SDPA), as a user's export gets it.
    return _bert(entry, transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=256,
                                                max_position_embeddings=256))


def _bert(entry: dict[str, Any], config: Any) -> ExportSpec:
    import torch
    import transformers

    model = transformers.BertModel(config)
    _randomize_parameters(model, config.initializer_range)
    batch, sequence = entry["verify_shapes"][0]["input_ids"]
    input_ids = torch.randint(0, config.vocab_size, (batch, sequence))
    # Padding at the end and a second segment, so that no all-ones mask or all-zeros segment
    # shortcut can be traced into the graph.
    attention_mask = _padded_mask(batch, sequence, sequence // 4)
    token_type_ids = torch.zeros(batch, sequence, dtype=torch.int64)
    token_type_ids[:, sequence // 2:] = 1
    tokens = {0: "batch", 1: "sequence"}
    return ExportSpec(
        model, (input_ids, attention_mask, token_type_ids),
        ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"],
        {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
         "last_hidden_state": tokens, "pooler_output": {0: "batch"}})


def _decoder_with_past(model: Any, entry: dict[str, Any], layers: int) -> ExportSpec:
    """A causal LM taking and returning its key/value cache as plain tensors.

    Inputs: input_ids [batch, sequence], attention_mask [batch, past_sequence + sequence] and
    past_key_<i>/past_value_<i> [batch, kv_heads, past_sequence, head_dim]; outputs: logits and
    present_key_<i>/present_value_<i> with the new tokens appended. The cache travels as a
    DynamicCache inside, as transformers' generate() passes it.
    """
    import torch
    from transformers.cache_utils import DynamicCache

    if layers != 2:
        raise ExportError(f"the key/value wrapper is written for 2 layers, not {layers}")

    class DecoderWithPast(torch.nn.Module):
        def __init__(self, decoder: Any) -> None:
            super().__init__()
            self.decoder = decoder

        # Named arguments, not *past: both exporters name the graph inputs after them.
        def forward(self, input_ids, attention_mask, past_key_0, past_value_0, past_key_1, past_value_1):
            cache = DynamicCache.from_legacy_cache(((past_key_0, past_value_0), (past_key_1, past_value_1)))
            output = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                  past_key_values=cache, use_cache=True)
            present = output.past_key_values.to_legacy_cache()
            return (output.logits, *[tensor for key_value in present for tensor in key_value])

    shapes = entry["verify_shapes"][0]
    batch, sequence = shapes["input_ids"]
    past_shape = shapes["past_key_0"]
    past_names = [f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]
    present_names = [name.replace("past_", "present_") for name in past_names]
    args = (torch.randint(0, model.config.vocab_size, (batch, sequence)),
            _padded_mask(batch, past_shape[2] + sequence, 1),
            *[torch.randn(past_shape) for _ in past_names])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names})
    return ExportSpec(DecoderWithPast(model), args, ["input_ids", "attention_mask", *past_names],
                      ["logits", *present_names], axes)


def _gpt2_with_past(entry: dict[str, Any]) -> ExportSpec:
    transformers = _quiet_transformers()
    config = transformers.GPT2Config(vocab_size=1000, n_positions=256, n_embd=128, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    _randomize_parameters(model, config.initializer_range)
    _traceable_masks(model, entry)
    return _decoder_with_past(model, entry, config.n_layer)


def _llama_with_past(entry: dict[str, Any]) -> ExportSpec:
    transformers = _quiet_transformers()
    # Grouped-query attention (2 key/value heads for 4 query heads), RMSNorm, rotary positions, SwiGLU.
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    _randomize_parameters(model, config.initializer_range)
    _traceable_masks(model, entry)
    return _decoder_with_past(model, entry, config.num_hidden_layers)


def _t5_encoder(entry: dict[str, Any]) -> ExportSpec:
    import torch

    transformers = _quiet_transformers()
    config = transformers.T5Config(vocab_size=1000, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=32)
    model = transformers.T5EncoderModel(config)
    _randomize_parameters(model)
    batch, sequence = entry["verify_shapes"][0]["input_ids"]
    tokens = {0: "batch", 1: "sequence"}
    return ExportSpec(model, (torch.randint(0, config.vocab_size, (batch, sequence)),
                              _padded_mask(batch, sequence, sequence // 4)),
                      ["input_ids", "attention_mask"], ["last_hidden_state"],
                      {"input_ids": tokens, "attention_mask": tokens, "last_hidden_state": tokens})


def _vit_tiny(entry: dict[str, Any]) -> ExportSpec:
    import torch

    transformers = _quiet_transformers()
    shape = entry["verify_shapes"][0]["pixel_values"]
    config = transformers.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=256, image_size=shape[2], patch_size=16)
    model = transformers.ViTModel(config)
    _randomize_parameters(model, config.initializer_range)
    return ExportSpec(model, (torch.randn(shape),), ["pixel_values"], ["last_hidden_state", "pooler_output"],
                      {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"},
                       "pooler_output": {0: "batch"}})


def _convnext_mini(entry: dict[str, Any]) -> ExportSpec:
    import torch
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    # convnext_tiny's blocks (7x7 depthwise conv, LayerNorm2d, inverted bottleneck, layer scale,
    # GELU) at a quarter of its width, in three stages of two blocks.
    model = ConvNeXt([CNBlockConfig(24, 48, 2), CNBlockConfig(48, 96, 2), CNBlockConfig(96, None, 2)],
                     stochastic_depth_prob=0.0, num_classes=10)
    _randomize_parameters(model)
    image = torch.randn(entry["verify_shapes"][0]["input"])
    return ExportSpec(model, (image,), ["input"], ["output"],
                      {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})


def _detections(detector: Any, keys: list[str]) -> Any:
    """A torchvision detector as one image in, its detections' `keys` out as tensors (the model
    takes and returns lists of dicts)."""
    import torch

    class Detections(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, image):
            detections = self.detector([image])[0]
            return tuple(detections[key] for key in keys)

    return Detections()


def _ssdlite(entry: dict[str, Any]) -> ExportSpec:
    import torch
    import torchvision

    # 91 COCO classes; the transform resizes any image to 320x320, then the heads, box decoding,
    # score threshold, per-class top-k and batched NMS.
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    _randomize_parameters(model)
    _set_batch_norm_statistics(model, lambda: model.backbone(torch.randn(8, 3, 320, 320)))
    image = torch.rand(entry["verify_shapes"][0]["image"])  # in [0, 1], as the transform expects
    outputs = ["boxes", "scores", "labels"]
    return ExportSpec(_detections(model, outputs), (image,), ["image"], outputs,
                      {"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                       "scores": {0: "detections"}, "labels": {0: "detections"}})


def _mask_rcnn_mini(entry: dict[str, Any]) -> ExportSpec:
    import torch
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    # Mask R-CNN's whole inference path (resize, RPN with its NMS, RoIAlign, box head, per-class
    # NMS, mask head, masks pasted into the image in a scripted loop) on a MobileNetV3-Small FPN
    # with narrow heads. BatchNorm2d instead of the default FrozenBatchNorm2d, whose scales and
    # offsets are buffers that no randomization would reach.
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True,
                                  norm_layer=torch.nn.BatchNorm2d, trainable_layers=6)
    channels, classes = backbone.out_channels, 5
    anchors = AnchorGenerator(((32, 64, 128, 256),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = MaskRCNN(backbone, num_classes=None, min_size=256, max_size=320, rpn_anchor_generator=anchors,
                     rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=20,
                     box_head=TwoMLPHead(channels * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, classes),
                     mask_head=MaskRCNNHeads(channels, (32, 32), 1), mask_predictor=MaskRCNNPredictor(32, 32, classes))
    _randomize_parameters(model)
    _set_batch_norm_statistics(model, lambda: model.backbone(torch.randn(8, 3, 256, 256)))
    image = torch.rand(entry["verify_shapes"][0]["image"])
    detections = {0: "detections"}
    outputs = ["boxes", "scores", "labels", "masks"]
    return ExportSpec(_detections(model, outputs), (image,), ["image"], outputs,
                      {"image": {1: "height", 2: "width"}, "boxes": detections, "scores": detections,
                       "labels": detections, "masks": {0: "detections", 2: "height", 3: "width"}})


def _audio_branches(entry: dict[str, Any]) -> ExportSpec:
    import torch

    classes, dim = 10, 48

    class FrontEnd(torch.nn.Module):
        """One sample rate's front end: a strided Conv1d stack with BatchNorm, frames as rows
        through a LayerNorm, GELU and a Linear, averaged over time into class scores."""

        def __init__(self, kernel: int, stride: int, channels: int) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv1d(1, channels, kernel, stride=stride)
            self.bn1 = torch.nn.BatchNorm1d(channels)
            self.conv2 = torch.nn.Conv1d(channels, dim, 3, stride=2, padding=1)
            self.bn2 = torch.nn.BatchNorm1d(dim)
            self.norm = torch.nn.LayerNorm(dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.head = torch.nn.Linear(dim, classes)
            self.dim = dim  # an attribute: scripting cannot read the closure's int

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(waveform.unsqueeze(1))))
            x = torch.relu(self.bn2(self.conv2(x)))
            batch, frames = x.shape[0], x.shape[2]
            rows = x.transpose(1, 2).reshape(batch * frames, self.dim)  # shapes computed in the branch
            rows = self.proj(torch.nn.functional.gelu(self.norm(rows)))
            return self.head(rows.reshape(batch, frames, self.dim).mean(1))

    class ScriptedClassifier(torch.nn.Module):
        """The front end is picked by the clip's length (its sample rate): scripted, the Python
        `if` on a shape becomes an ONNX If with each front end in a branch."""

        def __init__(self) -> None:
            super().__init__()
            self.wide = FrontEnd(kernel=400, stride=160, channels=32)  # 16 kHz: 25 ms windows, 10 ms hop
            self.narrow = FrontEnd(kernel=200, stride=80, channels=24)  # 8 kHz
            self.long_clip = 12000  # samples: a second at 16 kHz is longer, one at 8 kHz is not

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            if waveform.shape[1] > self.long_clip:
                return self.wide(waveform)
            return self.narrow(waveform)

    class CondClassifier(ScriptedClassifier):
        """The same choice through torch.cond, which the dynamo exporter turns into an If."""

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            return torch.cond(waveform.shape[1] > self.long_clip, self.wide, self.narrow, (waveform,))

    dynamo = entry.get("exporter", "torchscript") == "dynamo"
    model = CondClassifier() if dynamo else ScriptedClassifier()
    _randomize_parameters(model)
    _set_batch_norm_statistics(model, lambda: (model.wide(torch.randn(8, 16000)), model.narrow(torch.randn(8, 8000))))
    model.eval()
    waveform = torch.randn(entry["verify_shapes"][0]["waveform"])
    return ExportSpec(model if dynamo else torch.jit.script(model), (waveform,), ["waveform"], ["logits"],
                      {"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}})


def _frame_loop(entry: dict[str, Any]) -> ExportSpec:
    import torch

    features, hidden, classes = 16, 32, 6

    class FrameLoop(torch.nn.Module):
        """A recurrent cell written as a Python `for` over the frames: scripted, the loop over a
        dynamic count becomes an ONNX Loop with the cell's work (two Linears, LayerNorm, GELU, a
        reshape with computed shapes) in its body."""

        def __init__(self) -> None:
            super().__init__()
            self.input_proj = torch.nn.Linear(features, hidden)
            self.state_proj = torch.nn.Linear(hidden, hidden)
            self.norm = torch.nn.LayerNorm(hidden)
            self.head = torch.nn.Linear(hidden, classes)
            self.hidden = hidden

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            batch = frames.shape[0]
            state = torch.zeros(batch, self.hidden)
            for step in range(frames.shape[1]):
                frame = frames[:, step].reshape(batch, -1)
                mixed = self.input_proj(frame) + self.state_proj(state)
                state = torch.nn.functional.gelu(self.norm(mixed)) + 0.5 * state
            return self.head(state)

    model = FrameLoop()
    _randomize_parameters(model)
    model.eval()
    frames = torch.randn(entry["verify_shapes"][0]["frames"])
    return ExportSpec(torch.jit.script(model), (frames,), ["frames"], ["logits"],
                      {"frames": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})


def _recurrent_recipe(cell: str, bidirectional: bool) -> Callable[[dict[str, Any]], ExportSpec]:
    def build(entry: dict[str, Any]) -> ExportSpec:
        import torch

        batch, sequence, features = entry["verify_shapes"][0]["input"]
        hidden, classes = 64, 8

        class Tagger(torch.nn.Module):
            """Two recurrent layers over a feature sequence and a per-step linear head; the initial
            states are the zeros the layer starts from when none is given."""

            def __init__(self) -> None:
                super().__init__()
                self.rnn = getattr(torch.nn, cell)(features, hidden, num_layers=2, batch_first=True,
                                                   bidirectional=bidirectional)
                self.head = torch.nn.Linear(hidden * (2 if bidirectional else 1), classes)

            def forward(self, input):
                output, _ = self.rnn(input)
                return self.head(output)

        model = Tagger()
        # 0.02 would leave the gates' inputs near zero and the outputs near 1e-3; 1/sqrt(hidden)
        # is the range torch itself initializes recurrent layers with.
        _randomize_parameters(model, std=hidden ** -0.5)
        axes = {0: "batch", 1: "sequence"}
        return ExportSpec(model, (torch.randn(batch, sequence, features),), ["input"], ["output"],
                          {"input": axes, "output": axes})

    return build


def _sklearn_data(entry: dict[str, Any]) -> tuple[Any, Any]:
    """A seeded three-class problem with as many features as the model's input has."""
    import numpy as np
    from sklearn.datasets import make_classification

    features = entry["verify_shapes"][0]["input"][1]
    inputs, labels = make_classification(n_samples=400, n_features=features, n_informative=features // 2,
                                         n_classes=3, random_state=SEED)
    return inputs.astype(np.float32), labels


def _sklearn_to_onnx(pipeline: Any, entry: dict[str, Any], options: dict | None = None) -> Any:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    features = entry["verify_shapes"][0]["input"][1]
    return convert_sklearn(pipeline, initial_types=[("input", FloatTensorType([None, features]))],
                           target_opset={"": entry.get("opset", DEFAULT_OPSET), "ai.onnx.ml": 3},
                           options=options)


def _sklearn_logistic_regression(entry: dict[str, Any]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # skl2onnx's default for a classifier: the probabilities as a ZipMap, a sequence of
    # {class: probability} maps (the ai.onnx.ml domain).
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(*_sklearn_data(entry))
    return _sklearn_to_onnx(pipeline, entry)


def _sklearn_gradient_boosting(entry: dict[str, Any]) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    trees = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=SEED)
    pipeline = make_pipeline(StandardScaler(), trees).fit(*_sklearn_data(entry))
    # Probabilities as a plain tensor: a TreeEnsembleClassifier with ZipMap off.
    return _sklearn_to_onnx(pipeline, entry, options={id(trees): {"zipmap": False}})


_TORCH_RECIPES: dict[str, Callable[[dict[str, Any]], ExportSpec]] = {
    "resnet50": _torchvision_recipe("resnet50"),
    "mobilenetv2": _torchvision_recipe("mobilenet_v2"),
    "efficientnet-b0": _torchvision_recipe("efficientnet_b0"),
    "regnet-y-400mf": _torchvision_recipe("regnet_y_400mf"),
    "vit-b16": _torchvision_recipe("vit_b_16"),
    "bert-base": _bert_base,
    "gpt2-kv": _gpt2_with_past,
    "llama-kv": _llama_with_past,
    "bert-tiny": _bert_tiny,
    "t5-encoder": _t5_encoder,
    "vit-tiny": _vit_tiny,
    "convnext-mini": _convnext_mini,
    "ssdlite": _ssdlite,
    "mask-rcnn-mini": _mask_rcnn_mini,
    "lstm": _recurrent_recipe("LSTM", bidirectional=False),
    "gru": _recurrent_recipe("GRU", bidirectional=True),
    "audio-branches": _audio_branches,
    "frame-loop": _frame_loop,
}
# scikit-learn recipes return the ONNX model skl2onnx made.
_SKLEARN_RECIPES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "sklearn-logreg": _sklearn_logistic_regression,
    "sklearn-gbdt": _sklearn_gradient_boosting,
}
_RECIPES: dict[str, Callable[[dict[str, Any]], Any]] = {**_TORCH_RECIPES, **_SKLEARN_RECIPES}


def _export(name: str, entry: dict[str, Any], target: Path) -> None:
    """Build model `name` with seeded random weights and export it to `target` (atomically)."""
    _check_versions(name, entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".onnx")
    os.close(handle)
    partial = Path(partial_name)
    try:
        if entry.get("exporter") == "skl2onnx":
            partial.write_bytes(_SKLEARN_RECIPES[recipe_name(name, entry)](entry).SerializeToString())
        else:
            _torch_export(name, entry, partial)
        partial.chmod(0o644)  # mkstemp creates it private to the user
        os.replace(partial, target)
    except Exception as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"exporting {name} failed: {_describe_failure(e)}") from e


def _describe_failure(error: BaseException) -> str:
    """The error's type and first line, and those of its root cause: torch.onnx wraps what
    torch.export refused in a TorchExportError whose own first line says only which step failed."""
    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(error) if root is error else f"{line(error)} (caused by {line(root)})"


def _torch_export(name: str, entry: dict[str, Any], path: Path) -> None:
    import contextlib
    import warnings

    import torch

    torch.manual_seed(SEED)  # per model, so that one model's weights do not depend on the others
    spec = _TORCH_RECIPES[recipe_name(name, entry)](entry)
    spec.model.eval()
    dynamo = entry.get("exporter", "torchscript") == "dynamo"
    options: dict[str, Any] = {"do_constant_folding": True} if not dynamo else {"external_data": False}
    # Not under torch.no_grad(): without autograd, nn.MultiheadAttention (ViT) takes its fused
    # fast path, aten::_native_multi_head_attention, which has no ONNX export.
    # stdout carries this script's one line per model; the dynamo exporter's progress goes to stderr.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # The tracer warns about every Python-level shape check (ViT's image-size assert,
        # BERT's mask arithmetic); the verification shapes are what show the export is sound.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            spec.model, spec.args, str(path), dynamo=dynamo, opset_version=entry.get("opset", DEFAULT_OPSET),
            input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
            **options)


def _check_versions(name: str, entry: dict[str, Any]) -> None:
    from importlib.metadata import version

    for package in PINNED_PACKAGES:
        if package not in entry:
            continue
        installed = version(package).split("+", 1)[0]  # "2.14.1+cu130" -> "2.14.1"
        if installed != entry[package]:
            raise ExportError(f"{name} is pinned to {package} {entry[package]} in {MANIFEST_PATH.name}, "
                              f"the export venv has {installed}; make VENV_REQUIREMENTS and the "
                              "manifest agree")


# --- counting nodes without onnx ------------------------------------------------------------------

def count_nodes(path: Path) -> int:
    """Nodes of the model at `path`, those of If/Loop/Scan bodies included.

    Reads the protobuf wire format directly, so that `--list` needs neither onnx nor the venv.
    """
    model = memoryview(path.read_bytes())  # slices of a memoryview share its bytes: no copies
    return sum(_graph_nodes(graph) for field, graph in _fields(model) if field == 7)  # ModelProto.graph


def _graph_nodes(graph: memoryview) -> int:
    total = 0
    for field, node in _fields(graph):
        if field != 1:  # GraphProto.node
            continue
        total += 1
        for node_field, attribute in _fields(node):
            if node_field != 5:  # NodeProto.attribute
                continue
            for attribute_field, value in _fields(attribute):
                if attribute_field in (6, 11):  # AttributeProto.g, AttributeProto.graphs
                    total += _graph_nodes(value)
    return total


def _fields(buffer: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of each length-delimited field of a message; skips the others."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(buffer, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(buffer, position)
            yield key >> 3, buffer[position:position + length]
            position += length
        else:
            raise ExportError(f"unexpected protobuf wire type {wire_type}: not an ONNX model")


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


# --- command line ---------------------------------------------------------------------------------

def _human_size(size: int) -> str:
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _describe(name: str, entry: dict[str, Any], width: int) -> str:
    path = export_path(name)
    if "skipped" in entry:
        return f"{name:<{width}}  skipped: {entry['skipped']}"
    if not path.is_file():
        return f"{name:<{width}}  {path}  not exported"
    return f"{name:<{width}}  {path}  {_human_size(path.stat().st_size)}  {count_nodes(path)} nodes"


def _rerun_in_venv(arguments: list[str]) -> int:
    command = [str(ensure_venv()), str(Path(__file__).resolve()), *arguments]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export the PyTorch models of models/exports.toml to <cache>/exports/NAME.onnx "
                    "(cache: ONNXSLIM_CACHE, else .cache/ at the repository root), in a torch "
                    "virtualenv that the first run creates at <cache>/export-venv.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="models to export (default: all)")
    parser.add_argument("--force", action="store_true", help="export again even if already exported")
    parser.add_argument("--list", action="store_true", help="show the manifest's models and which are exported")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    arguments = argv if argv is not None else sys.argv[1:]
    try:
        if tomllib is None and not _in_export_venv():
            # Python 3.10 without tomli cannot read the manifest; the venv's Python 3.11 can.
            return _rerun_in_venv(arguments)
        models = load_manifest()
        names = args.names or list(models)
        for name in names:
            _entry(name, allow_skipped=True)
        width = max(map(len, names))
        if args.list:
            for name in names:
                print(_describe(name, models[name], width))
            return 0
        pending = [name for name in exportable({name: models[name] for name in names})
                   if args.force or not export_path(name).is_file()]
        if pending and not _in_export_venv():
            return _rerun_in_venv(arguments)
        failures = 0
        for name in names:
            if name in pending:
                try:
                    _export(name, models[name], export_path(name))
                except ExportError as e:
                    if len(names) == 1 or args.debug:
                        raise
                    # One model failing must not keep the others from being exported.
                    print(f"export_models: error: {e}", file=sys.stderr, flush=True)
                    failures += 1
                    continue
            print(_describe(name, models[name], width), flush=True)
        if failures:
            return 2
    except ExportError as e:
        if args.debug:
            raise
        print(f"export_models: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the cache directory is not writable
        if args.debug:
            raise
        print(f"export_models: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
