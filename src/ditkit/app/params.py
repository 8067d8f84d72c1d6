"""The page's requests checked and turned into Pipeline arguments. Every problem is a ValueError of one line
that the page shows as it is, so each message names the field and what it accepts."""
from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ditkit.data.folder import flatten

MAX_STEPS = 1000
MAX_IMAGES = 64  # per request: samples per class x classes
MAX_CFG = 100.0
MAX_PROMPT = 500  # characters
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # one uploaded image or mask, decoded
MAX_UPLOAD_SIDE = 4096  # pixels; a larger image is refused before it is decoded
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def whole(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi] from a JSON number or a form's text."""
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    return int(number)


def real(value: Any, name: str, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] from a JSON number or a form's text."""
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return number


def flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "1", 1, "on"):
        return True
    if value in ("false", "0", 0, "off", None, ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def sampling(body: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """sampler, steps, cfg, cfg_interval and seed; a missing one is None (the run's own setting)."""
    out: dict[str, Any] = {}
    sampler = body.get("sampler")
    if not _missing(sampler):
        if sampler not in facts["samplers"]:
            raise ValueError(f"sampler must be one of {', '.join(facts['samplers'])} for this run, got {sampler!r}")
        out["sampler"] = sampler
    if not _missing(body.get("steps")):
        out["steps"] = whole(body["steps"], "steps", 1, MAX_STEPS)
    if not _missing(body.get("cfg")):
        out["cfg"] = real(body["cfg"], "CFG scale", 0.0, MAX_CFG)
    interval = body.get("cfg_interval")
    if not _missing(interval):
        if isinstance(interval, str):
            interval = [part for part in interval.replace(",", " ").split() if part]
        if not isinstance(interval, (list, tuple)) or len(interval) != 2:
            raise ValueError(f"guidance interval must be two numbers lo, hi in [0, 1], got {body['cfg_interval']!r}")
        lo, hi = (real(v, "guidance interval", 0.0, 1.0) for v in interval)
        if lo > hi:
            raise ValueError(f"guidance interval must have lo <= hi, got {lo:g}, {hi:g}")
        out["cfg_interval"] = (lo, hi)
    out["seed"] = 0 if _missing(body.get("seed")) else whole(body["seed"], "seed", 0, 2**63 - 1)
    return out


def class_label(value: Any, facts: dict[str, Any]) -> int:
    K = facts["num_classes"]
    if not facts["conditional"]:
        raise ValueError("this model is unconditional: it takes no class")
    try:
        return whole(value, "class", 0, K - 1)
    except ValueError:
        raise ValueError(f"class {value!r} is out of range: this model has classes 0..{K - 1}") from None


def prompts(value: Any) -> list[str]:
    """One prompt per line (or a list); blank lines are dropped."""
    lines = value if isinstance(value, list) else str(value or "").splitlines()
    found = [str(p).strip() for p in lines if str(p).strip()]
    if not found:
        raise ValueError("enter a prompt: this is a text-to-image run")
    long = [p for p in found if len(p) > MAX_PROMPT]
    if long:
        raise ValueError(f"a prompt may have at most {MAX_PROMPT} characters, one has {len(long[0])}")
    return found


def generate_args(body: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Arguments of `Pipeline.generate` from the playground's form."""
    kind = facts["kind"]
    if kind == "control":
        raise ValueError("a control run generates from a condition image: use Edit and upload one")
    args = sampling(body, facts)
    n = whole(body.get("n", 1), "number of samples", 1, MAX_IMAGES)
    if kind == "text":
        args["prompts"] = prompts(body.get("prompts"))
    elif facts["conditional"]:
        raw = body.get("classes")
        if _missing(raw) or raw == "all":
            classes = list(range(facts["num_classes"]))[:10]  # "all": up to 10 columns, as the trainer's grid
        else:
            raw = raw if isinstance(raw, list) else str(raw).replace(",", " ").split()
            classes = [class_label(v, facts) for v in raw]
        args["classes"] = classes
    else:
        args["classes"] = None
    columns = len(args.get("prompts") or args.get("classes") or [0])
    if n * columns > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} images per request: {n} samples x {columns} "
                         f"{'prompts' if kind == 'text' else 'classes'} is {n * columns}")
    args["n_per_class"] = n
    if kind == "video" and not _missing(body.get("frames")):
        args["frames"] = whole(body["frames"], "frames", 1, 64)
    if not _missing(body.get("first_frame")):
        if kind != "video":
            article = "an" if kind[0] in "aeiou" else "a"
            raise ValueError(f"a first frame starts a clip: it applies to video runs, and this is {article} {kind} run")
        args["first_frame"] = frame_tensor(decode_upload(body["first_frame"], "first frame"))
    if facts.get("adapter") and not _missing(body.get("lora_scale")):
        args["lora_scale"] = real(body["lora_scale"], "LoRA scale", MIN_LORA_SCALE, MAX_LORA_SCALE)
    if not facts["conditional"]:
        args.pop("cfg", None)  # nothing to guide towards
    return args


MIN_LORA_SCALE, MAX_LORA_SCALE = -1.0, 4.0  # beyond these an adapter only distorts the base
MAX_ADAPTERS = 8  # further adapter runs composed on one base per request


def adapter_weights(value: Any, facts: dict[str, Any]) -> dict[str, float]:
    """Further adapter runs {served run id: weight} to compose with the loaded adapter run; {} for none."""
    if _missing(value) or value == {}:
        return {}
    if not facts.get("adapter"):
        raise ValueError("further adapters combine with an adapter run (one trained with lora_rank): load one of "
                         "them as the run and tick the others")
    if not isinstance(value, dict):
        raise ValueError(f"adapters must be an object {{run: weight}}, got {type(value).__name__}")
    if len(value) > MAX_ADAPTERS:
        raise ValueError(f"at most {MAX_ADAPTERS} further adapters at once, got {len(value)}")
    return {str(run): real(weight, f"the weight of adapter {run}", MIN_LORA_SCALE, MAX_LORA_SCALE)
            for run, weight in value.items()}


def edit_args(body: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Arguments of `Pipeline.edit` from the editing form: the image and mask decoded, checked and resized
    to the model's size."""
    if facts["kind"] == "video":
        raise ValueError("editing works on image runs; this is a video run")
    if facts["channels"] not in (1, 3):
        raise ValueError(f"editing works on pixel images; this run's model has {facts['channels']} channels "
                         "(a latent run)")
    args = sampling(body, facts)
    args.pop("cfg_interval", None)
    if _missing(body.get("image")):
        raise ValueError("upload an image to edit")
    H, W = facts["image_size"]
    args["image"] = image_tensor(decode_upload(body["image"], "image"), facts["channels"], (H, W))
    if not _missing(body.get("mask")):
        args["mask"] = mask_tensor(decode_upload(body["mask"], "mask"), (H, W))
    if not _missing(body.get("strength")):
        args["strength"] = real(body["strength"], "strength", 0.0, 1.0)
    args["n"] = whole(body.get("n", 1), "number of samples", 1, MAX_IMAGES)
    if facts["kind"] == "text":
        args["prompt"] = prompts(body.get("prompts"))[0]
    elif not _missing(body.get("classes")) and body.get("classes") != "all" and facts["conditional"]:
        raw = body["classes"]
        args["class_label"] = class_label(raw[0] if isinstance(raw, list) else raw, facts)
    if "class_label" not in args and "prompt" not in args:
        args.pop("cfg", None)
    return args


def decode_upload(data: Any, name: str) -> Image.Image:
    """A data URL (or bare base64) of an image file -> a loaded PIL image, after checks of size and format."""
    if not isinstance(data, str):
        raise ValueError(f"the {name} must be sent as a data URL, got {type(data).__name__}")
    payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    if len(payload) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise ValueError(f"the {name} is too large: at most {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {name} upload is not valid base64 data") from None
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt, (w, h) = probe.format, probe.size
            if fmt not in UPLOAD_FORMATS:
                raise ValueError(f"the {name} must be one of {', '.join(UPLOAD_FORMATS)}, got {fmt}")
            if w > MAX_UPLOAD_SIDE or h > MAX_UPLOAD_SIDE:
                raise ValueError(f"the {name} is {w}x{h}: at most {MAX_UPLOAD_SIDE} pixels a side")
            probe.verify()  # the whole file is read: truncated or corrupt data fails here
        image = Image.open(io.BytesIO(raw))
        image.load()
    except ValueError:
        raise
    except Exception as err:  # PIL's errors for damaged files are of many types
        raise ValueError(f"the {name} could not be read as an image ({type(err).__name__}): "
                         "upload a PNG or JPEG file") from None
    return image


def image_tensor(image: Image.Image, channels: int, size: tuple[int, int]) -> Tensor:
    """(1, C, H, W) in [-1, 1] at the model's size and channels (transparent pixels become white)."""
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1).unsqueeze(0)


def frame_tensor(image: Image.Image) -> Tensor:
    """(1, C, H, W) in [-1, 1] at the upload's own size, C = 1 for a grey image and 3 for a colour one, read
    as `ditkit sample --first-frame` reads a file: the Pipeline fits it to the model and notes what it changed."""
    image = flatten(image)  # transparency on white; 16-bit grey kept in range
    grey = image.mode in ("1", "L", "F")
    arr = (np.asarray(image, dtype=np.float32) * 255 if image.mode == "F"
           else np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32))
    arr = arr[None] if grey else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1).unsqueeze(0)


def mask_tensor(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """(1, 1, H, W): 1 (regenerate) where the mask is light, 0 (keep) where dark or transparent."""
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "black"), image.convert("RGBA"))
    grey = image.convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    mask = (np.asarray(grey) >= 128).astype(np.float32)
    if not mask.any():
        raise ValueError("the mask is empty: paint (white) where the image should be regenerated")
    return torch.from_numpy(mask)[None, None]
