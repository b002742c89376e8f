"""The explorer's small HTTP server: one page (package data, no external assets) and a JSON API.

Routes:
    GET  /                     the page (``explorer.html``, read with importlib.resources)
    GET  /api/blocks           every registered block's facts, with benchmark numbers where measured
    GET  /api/images           the bundled photo names and the uploaded images' ids
    GET  /api/image?id=ID      the image as PNG (longer side at most 512 pixels)
    POST /api/upload           body: an image file's bytes -> {"id", "width", "height"}
    GET  /api/map?block=NAME&image=ID&x=X&y=Y&causal=0|1
                               the query map of image pixel (X, Y) on the feature grid (1 at the query cell,
                               the rest scaled to max 1: render.display_map),
                               and the softmax probabilities where the block has them

Maps are computed on a small feature map (``grid`` cells on the longer side, ``channels`` channels), so a
click answers in well under a second for most blocks on a laptop CPU. One lock serialises the computations
(torch already uses every core). Errors are JSON ``{"error": message}`` with status 400 (a bad request) or
500 (a block that failed), never a traceback page.
"""

from __future__ import annotations

import io
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

import torch

from ..registry import attn_info, list_attns
from .images import BUNDLED, load_image
from .maps import attention_probs, build_block, feature_map, query_map, to_grid
from .render import display_map

__all__ = ["ExplorerServer", "block_facts", "make_server", "page_html"]

#: The displayed image's longer side, in pixels; clicks arrive in these coordinates.
DISPLAY = 512
#: Largest upload accepted (bytes).
MAX_UPLOAD = 20 * 1024 * 1024


def page_html() -> bytes:
    """The explorer page, from the package (works the same from a checkout and a wheel)."""
    return resources.files("visattn.viz").joinpath("explorer.html").read_bytes()


def _bench_table() -> dict:
    """Benchmark facts per block (package data written by tools/make_gallery.py); {} when absent."""
    try:
        text = resources.files("visattn.viz").joinpath("bench_facts.json").read_text()
    except (FileNotFoundError, OSError):
        return {}
    return json.loads(text)


def block_facts() -> list[dict]:
    """Every registered block's facts for the page: paper, complexity, flags and measured time/memory."""
    bench = _bench_table()
    rows = []
    for name in list_attns():
        i = attn_info(name)
        rows.append(
            {
                "name": name,
                "title": i.title,
                "arxiv": i.arxiv,
                "year": i.year,
                "family": i.family,
                "complexity": i.complexity,
                "causal": i.causal,
                "identity_init": i.identity_init,
                "idea": i.idea,
                "bench": bench.get("blocks", {}).get(name),
                "bench_setting": bench.get("setting"),
            }
        )
    return rows


class ExplorerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the images, feature maps and blocks the page works on."""

    daemon_threads = True

    def __init__(self, address, *, grid: int = 32, channels: int = 8, seed: int = 0) -> None:
        super().__init__(address, _Handler)
        self.grid, self.channels, self.seed = int(grid), int(channels), int(seed)
        self.lock = threading.Lock()
        self.images: dict[str, object] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.blocks: dict[tuple[str, bool], torch.nn.Module] = {}
        self.uploads = 0

    def image(self, image_id: str):
        """The (H, W, 3) uint8 array of a bundled photo or an upload, resized to :data:`DISPLAY`."""
        if image_id not in self.images:
            if image_id not in BUNDLED:
                raise ValueError(f"unknown image {image_id!r}; bundled: {', '.join(BUNDLED)}, or upload one")
            self.images[image_id] = _fit(load_image(image_id))
        return self.images[image_id]

    def add_upload(self, data: bytes) -> str:
        import numpy as np
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any unreadable upload: one message
            raise ValueError(f"the uploaded file is not an image PIL reads ({type(err).__name__})") from err
        self.uploads += 1
        image_id = f"upload-{self.uploads}"
        self.images[image_id] = _fit(arr)
        return image_id

    def grid_size(self, image) -> tuple[int, int]:
        ih, iw = image.shape[:2]
        g = self.grid
        return (g, max(1, round(g * iw / ih))) if ih >= iw else (max(1, round(g * ih / iw)), g)

    def compute(self, name: str, image_id: str, x: float, y: float, causal: bool) -> dict:
        """The JSON answer of /api/map."""
        attn_info(name)  # unknown block: ValueError with close names
        if causal and not attn_info(name).causal:
            raise ValueError(f"block {name!r} has no causal mode")
        with self.lock:
            image = self.image(image_id)
            gh, gw = self.grid_size(image)
            if image_id not in self.features:
                self.features[image_id] = feature_map(image, self.channels, (gh, gw), seed=self.seed)
            feats = self.features[image_id]
            cell = to_grid((x, y), image.shape[:2], (gh, gw))
            key = (name, causal)
            if key not in self.blocks:
                self.blocks[key] = build_block(name, self.channels, causal=causal, seed=self.seed)
            block = self.blocks[key]
            start = time.perf_counter()
            m = query_map(block, feats, [cell], seed=self.seed)[0]
            probs = attention_probs(block, feats, cell, seed=self.seed)
            ms = (time.perf_counter() - start) * 1e3
        norm = display_map(m, cell).tolist()
        out = {
            "block": name,
            "causal": causal,
            "image": image_id,
            "grid": [gh, gw],
            "cell": [cell[0], cell[1]],
            "query": [x, y],
            "map": norm,
            "finite": bool(torch.isfinite(m).all()),
            "ms": round(ms, 1),
            "probs": None,
        }
        if probs is not None:
            pm = probs.mean
            pt = float(pm.max())
            out["probs"] = {
                "map": (pm / pt if pt > 0 else pm).tolist(),
                "source": probs.source,
                "heads": int(probs.per_head.shape[0]),
                "keys": int(probs.key_set.sum()),
                "extra_mass": float(probs.extra_mass.mean()),
            }
        return out


def _fit(arr):
    """Resize an (H, W, 3) array so its longer side is at most :data:`DISPLAY` pixels."""
    import numpy as np
    from PIL import Image

    h, w = arr.shape[:2]
    s = DISPLAY / max(h, w)
    if s >= 1:
        return np.ascontiguousarray(arr)
    img = Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return np.asarray(img)


class _Handler(BaseHTTPRequestHandler):
    server: ExplorerServer

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the command stays quiet; errors reach the page as JSON

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, page_html(), "text/html; charset=utf-8")
            elif url.path == "/api/blocks":
                self._json(block_facts())
            elif url.path == "/api/images":
                self._json({"bundled": list(BUNDLED), "uploads": [k for k in self.server.images if "-" in k]})
            elif url.path == "/api/image":
                from PIL import Image

                with self.server.lock:
                    arr = self.server.image(q.get("id", "astronaut"))
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                self._send(200, buf.getvalue(), "image/png")
            elif url.path == "/api/map":
                try:
                    x, y = float(q["x"]), float(q["y"])
                    name = q["block"]
                except (KeyError, ValueError):
                    raise ValueError("/api/map needs block=NAME, x=X and y=Y (numbers)") from None
                causal = q.get("causal", "0") in ("1", "true")
                self._json(self.server.compute(name, q.get("image", "astronaut"), x, y, causal))
            else:
                self._json({"error": f"no such page {url.path}"}, HTTPStatus.NOT_FOUND)
        except ValueError as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except Exception as err:  # noqa: BLE001 - a failing block must not kill the server
            self._json({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        try:
            if url.path != "/api/upload":
                self._json({"error": f"no such endpoint {url.path}"}, HTTPStatus.NOT_FOUND)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_UPLOAD:
                raise ValueError(f"upload must be 1 byte to {MAX_UPLOAD // 2**20} MiB, got {length} bytes")
            data = self.rfile.read(length)
            with self.server.lock:
                image_id = self.server.add_upload(data)
                h, w = self.server.images[image_id].shape[:2]
            self._json({"id": image_id, "width": w, "height": h})
        except ValueError as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)


def make_server(
    host: str = "127.0.0.1", port: int = 0, *, grid: int = 32, channels: int = 8
) -> ExplorerServer:
    """An :class:`ExplorerServer` bound to ``host:port`` (port 0: a free one); call ``serve_forever()``."""
    if channels < 3:
        raise ValueError(f"explorer channels must be at least 3 (the image's colours), got {channels}")
    try:
        return ExplorerServer((host, port), grid=grid, channels=channels)
    except OSError as err:
        raise ValueError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port"
        ) from err
