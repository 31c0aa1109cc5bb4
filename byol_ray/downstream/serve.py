"""``byol-ray serve``: a registered encoder behind HTTP on Ray Serve, for clients that hold images, not tensors.

A request carries images as the client has them; the replica applies the model card's evaluation transform
(:func:`byol_ray.preprocess.eval_crop`, the one ``embed`` and the eval loaders use) and encodes the crops of
concurrent requests together (``@serve.batch``), on its GPU when it has one.

    POST <route>   Content-Type: image/jpeg | image/png | application/octet-stream, body = one encoded image
                   -> {"model": "models:/<name>/<version>", "feature_dim": D, "embedding": [D floats]}
    POST <route>   Content-Type: application/json,
                   body = {"images": [base64 JPEG/PNG, ...]} and/or {"arrays": [uint8 [H][W][3] or [H][W], ...]}
                   -> {"model": ..., "feature_dim": D, "embeddings": [[D floats], ...]} (images first, then arrays)
    GET  <route>   -> the model card: model, feature_dim, resolution, eval_transform
    A body that is not an image answers 400 with {"error": "..."}.

The registered module itself is untouched: it stays a trainable ``nn.Module`` in the registry; the
replicas load the pinned version (``models:/<name>/<version>``, resolved once when the app starts, so a
moving alias never splits replicas across versions).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
from ray import serve

MAX_IMAGES_PER_REQUEST = 256


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB uint8 [H, W, 3]; ValueError when they are not an image."""
    from PIL import Image

    from byol_ray.data.sources import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Image.UnidentifiedImageError:
        raise ValueError("not an image format this server reads (JPEG, PNG, WebP, BMP, TIFF, ...)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"the image does not decode ({type(exc).__name__}: {exc})") from None


def as_image_array(value) -> np.ndarray:
    """A JSON array (uint8 [H][W][3], [H][W][4] or greyscale [H][W]) -> RGB uint8 [H, W, 3]."""
    array = np.asarray(value)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"an array image must be [H][W][3] (RGB), [H][W][4] (RGBA) or [H][W] (grey); got shape "
                         f"{list(array.shape)}")
    if array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255:
        raise ValueError("array images hold integers 0..255 (uint8 pixels)")
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8))


def decode_request(body: bytes, content_type: str) -> tuple[list[np.ndarray], bool]:
    """The images of one request and whether it was a single raw image (answered with ``embedding``)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "application/json":
        if not body:
            raise ValueError("empty body; POST an image (Content-Type: image/jpeg) or JSON {\"images\": [...]}")
        return [decode_image(body)], True
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the JSON body does not parse ({exc})") from None
    if not isinstance(payload, dict) or not ({"images", "arrays"} & payload.keys()):
        raise ValueError('a JSON body is {"images": [base64 JPEG/PNG, ...]} and/or {"arrays": [[[r, g, b], ...]]}')
    images = []
    for i, item in enumerate(payload.get("images") or []):
        try:
            data = base64.b64decode(item, validate=True)
        except (ValueError, TypeError):
            raise ValueError(f"images[{i}] is not base64") from None
        try:
            images.append(decode_image(data))
        except ValueError as exc:
            raise ValueError(f"images[{i}]: {exc}") from None
    for i, item in enumerate(payload.get("arrays") or []):
        try:
            images.append(as_image_array(item))
        except ValueError as exc:
            raise ValueError(f"arrays[{i}]: {exc}") from None
    if not images:
        raise ValueError("the request holds no images")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{len(images)} images in one request; send at most {MAX_IMAGES_PER_REQUEST} per request")
    return images, False


@serve.deployment(name="encoder")
class EncoderService:
    """One replica: the encoder on its device, the card's eval crop per image, crops encoded in batches."""

    def __init__(self, model_uri: str, tracking_uri: str, resolution: int, center_crop_ratio: float,
                 precision: str = "auto", max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01) -> None:

        from byol_ray.device import pick_device
        from byol_ray.evaluation.features import wants_bf16
        from byol_ray.registry import load_encoder

        self.device = pick_device("auto")
        encoder, info = load_encoder(model_uri, tracking_uri=tracking_uri, map_location=self.device)
        self.encoder = encoder.to(self.device).eval()
        self.bf16 = wants_bf16(precision, self.device)
        self.resolution, self.center_crop_ratio = resolution, center_crop_ratio
        self.card = {"model": info.uri, "feature_dim": info.feature_dim, "resolution": resolution,
                     "center_crop_ratio": center_crop_ratio, "device": str(self.device),
                     "eval_transform": json.loads(info.tags.get("eval_transform") or "{}")}
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode_batch(self, crops: list) -> list[list[float]]:
        """uint8 [3, R, R] crops from concurrent requests -> one encoder call -> a [D] list per crop."""
        import torch

        from byol_ray.evaluation.features import encode

        return encode(self.encoder, torch.stack(crops).to(self.device), bf16=self.bf16).tolist()

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from byol_ray.preprocess import eval_crop

        if request.method == "GET":
            return JSONResponse(self.card)
        try:
            images, single = decode_request(await request.body(), request.headers.get("content-type", ""))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        crops = [eval_crop(image, self.resolution, self.center_crop_ratio) for image in images]
        vectors = await asyncio.gather(*(self.encode_batch(crop) for crop in crops))
        answer = {"model": self.card["model"], "feature_dim": len(vectors[0])}
        answer.update({"embedding": vectors[0]} if single else {"embeddings": list(vectors)})
        return JSONResponse(answer)


def build_app(model_uri: str, tracking_uri: str, *, resolution: int, center_crop_ratio: float, precision: str,
              max_batch_size: int, batch_wait_timeout_s: float, num_replicas: int, max_replicas: int,
              num_gpus: float, num_cpus: float):
    """The bound Serve application: fixed ``num_replicas``, or autoscaling up to ``max_replicas`` when larger."""
    options = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
               "max_ongoing_requests": max(2 * max_batch_size, 8)}
    if max_replicas > num_replicas:
        options["autoscaling_config"] = {"min_replicas": num_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": max_batch_size}
    else:
        options["num_replicas"] = num_replicas
    return EncoderService.options(**options).bind(model_uri, tracking_uri, resolution, center_crop_ratio, precision,
                                                  max_batch_size, batch_wait_timeout_s)
